//! The remote-reference ledger: torch's `RRefContext` bookkeeping as a state machine without I/O.
//!
//! Each worker has one ledger. The agent feeds it events (a reference was created, forked,
//! received, confirmed, dropped; a control message arrived) and carries out the [`Effect`]s it
//! returns (send a control message, drop a value, wake waiters). Because it does no I/O, every
//! flow of the protocol is tested by asserting the exact effects.
//!
//! ```text
//!  user→user fork (A holds a user, passes it to B; C owns):
//!   A: fork_sent(parent, child)           A keeps parent alive (pending child)        [G2]
//!   B: fork_received(child, parent=A)  ──► ForkRequest(rref, child) ──► C: fork_request: forks += child
//!   B: fork_acked(child)  ◄── ack ───────────────────────────────────────┘
//!   B: ──► ChildAccept(child) ──► A: child_accepted: parent may now be deleted
//!   B: user_dropped(child) ──► UserDelete(rref, child) ──► C: user_delete: forks -= child
//!                                                         C drops the value when no fork and no
//!                                                         local handle remains              [G1]
//!  owner→user fork: C adds the child to its forks when it sends it (early registration); B's
//!   user is confirmed on arrival, no message.
//!  user→owner fork: C gets an owner handle and sends ChildAccept to the parent; no fork is added.
//! ```
//!
//! A user that is dropped before it is confirmed, or while children it forked are unconfirmed,
//! is deleted only once both are settled: its delete can never overtake its own fork request,
//! and a parent cannot vanish before its child is known to the owner.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// A globally unique id: the worker that made it and a counter on that worker (torch's
/// `GloballyUniqueId`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GlobalId {
    /// Rank of the worker that created the id.
    pub created_on: u32,
    /// Counter on that worker.
    pub local_id: u64,
}

impl fmt::Display for GlobalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GloballyUniqueId(created_on={}, local_id={})",
            self.created_on, self.local_id
        )
    }
}

/// Identifies a remote value (its owner reference).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RRefId(pub GlobalId);

/// Identifies one user reference to a remote value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ForkId(pub GlobalId);

/// A control message of the reference protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Child → owner: a user reference was forked to me.
    ForkRequest {
        /// The value.
        rref: RRefId,
        /// The new user.
        fork: ForkId,
    },
    /// Child (or owner) → parent: the owner knows of this child; the parent may go.
    ChildAccept {
        /// The child.
        fork: ForkId,
    },
    /// User → owner: this user reference was deleted.
    UserDelete {
        /// The value.
        rref: RRefId,
        /// The deleted user.
        fork: ForkId,
    },
}

/// What the ledger asks the agent to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Send a control message to worker `to` (retried until acknowledged: every one is
    /// idempotent).
    Send {
        /// Destination rank.
        to: u32,
        /// The message.
        msg: Control,
    },
    /// No reference to this value remains anywhere: the owner drops it.
    DropValue(RRefId),
    /// This user reference is now confirmed by its owner.
    Confirmed(ForkId),
}

/// A protocol violation: an event that cannot happen in a correct run (a bug or a lying peer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rref protocol: {0}")]
pub struct LedgerError(pub String);

#[derive(Debug, Default)]
struct Owned {
    forks: HashSet<ForkId>,
    handles: usize,
    /// Registered by a fork request that overtook the creation: kept at least until the
    /// creation arrives (or its creator gives up).
    awaiting_creation: bool,
}

#[derive(Debug)]
struct User {
    rref: RRefId,
    owner: u32,
    /// The worker that forked this user to us, to be told once the owner confirms it (`None`
    /// for the creator's user and for forks from the owner).
    parent: Option<u32>,
    confirmed: bool,
    handles: usize,
    pending_children: usize,
}

/// One worker's reference bookkeeping.
#[derive(Debug)]
pub struct Ledger {
    me: u32,
    next_id: u64,
    owned: HashMap<RRefId, Owned>,
    users: HashMap<ForkId, User>,
    /// Children this worker forked from a user that the owner has not confirmed yet, with that
    /// user, which must stay alive until then (G2). Forks from the owner need no such hold:
    /// the owner registers them when it sends them.
    pending_children: HashMap<ForkId, ForkId>,
    /// Users deleted before the owner saw their creation (a delayed `remote()`): the creation,
    /// when it comes, must not keep the value for them.
    tombstones: HashSet<ForkId>,
}

/// Counters for debug info, with torch's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LedgerInfo {
    /// Values this worker owns (`num_owner_rrefs`).
    pub num_owner_rrefs: usize,
    /// User references not yet confirmed (`num_pending_users`).
    pub num_pending_users: usize,
    /// Forks of owned values (`num_forks`).
    pub num_forks: usize,
    /// User references alive on this worker.
    pub num_users: usize,
    /// Children forked from here and not yet accepted.
    pub num_pending_children: usize,
}

fn violation(msg: impl Into<String>) -> LedgerError {
    LedgerError(msg.into())
}

impl Ledger {
    /// The ledger of worker `me`.
    pub fn new(me: u32) -> Self {
        Self {
            me,
            next_id: 0,
            owned: HashMap::new(),
            users: HashMap::new(),
            pending_children: HashMap::new(),
            tombstones: HashSet::new(),
        }
    }

    /// A new id created on this worker.
    pub fn next_id(&mut self) -> GlobalId {
        self.next_id += 1;
        GlobalId {
            created_on: self.me,
            local_id: self.next_id,
        }
    }

    /// Counters for debug info.
    pub fn info(&self) -> LedgerInfo {
        LedgerInfo {
            num_owner_rrefs: self.owned.len(),
            num_pending_users: self.users.values().filter(|u| !u.confirmed).count(),
            num_forks: self.owned.values().map(|o| o.forks.len()).sum(),
            num_users: self.users.len(),
            num_pending_children: self.pending_children.len(),
        }
    }

    /// Whether this worker owns `rref`.
    pub fn owns(&self, rref: RRefId) -> bool {
        self.owned.contains_key(&rref)
    }

    /// Whether `fork` is a live user reference on this worker.
    pub fn is_user(&self, fork: ForkId) -> bool {
        self.users.contains_key(&fork)
    }

    /// Every live user reference on this worker.
    pub fn users(&self) -> Vec<ForkId> {
        self.users.keys().copied().collect()
    }

    /// Whether the user reference `fork` is confirmed by its owner.
    pub fn is_confirmed(&self, fork: ForkId) -> bool {
        self.users.get(&fork).is_some_and(|u| u.confirmed)
    }

    // ---- owner side ----

    /// A value was created here: by `remote()` from a creator whose user is `creator_fork`, or
    /// locally (`None`: one local handle, no fork). A creator that already deleted its user
    /// (its delete overtook a delayed creation) adds nothing, and the value may go at once.
    pub fn owner_created(&mut self, rref: RRefId, creator_fork: Option<ForkId>) -> Vec<Effect> {
        let owned = self.owned.entry(rref).or_default();
        owned.awaiting_creation = false;
        match creator_fork {
            Some(f) if self.tombstones.remove(&f) => return self.maybe_drop(rref),
            Some(f) => {
                owned.forks.insert(f);
            }
            None => owned.handles += 1,
        }
        Vec::new()
    }

    /// Another local handle to an owned value.
    pub fn owner_handle_added(&mut self, rref: RRefId) -> Result<(), LedgerError> {
        let owned = self
            .owned
            .get_mut(&rref)
            .ok_or_else(|| violation(format!("no owned value {:?}", rref.0)))?;
        owned.handles += 1;
        Ok(())
    }

    /// A local handle to an owned value was dropped.
    pub fn owner_handle_dropped(&mut self, rref: RRefId) -> Vec<Effect> {
        let Some(owned) = self.owned.get_mut(&rref) else {
            return Vec::new();
        };
        owned.handles = owned.handles.saturating_sub(1);
        self.maybe_drop(rref)
    }

    /// A child asks to be added (idempotent: a retried request adds nothing). The request may
    /// overtake the creation itself (it travels on another connection): it then registers the
    /// value ahead of it, as torch's `getOrCreateOwnerRRef` does.
    pub fn fork_request(&mut self, rref: RRefId, fork: ForkId) {
        self.owned_ahead(rref).forks.insert(fork);
    }

    /// The entry of an owned value, registering it if a message about it overtook its creation
    /// (a value made elsewhere by `remote()`): it then waits for that creation.
    fn owned_ahead(&mut self, rref: RRefId) -> &mut Owned {
        let me = self.me;
        self.owned.entry(rref).or_insert_with(|| Owned {
            awaiting_creation: rref.0.created_on != me,
            ..Owned::default()
        })
    }

    /// A user was deleted (idempotent).
    pub fn user_delete(&mut self, rref: RRefId, fork: ForkId) -> Vec<Effect> {
        let removed = self
            .owned
            .get_mut(&rref)
            .is_some_and(|owned| owned.forks.remove(&fork));
        if removed {
            return self.maybe_drop(rref);
        }
        // A fork never seen here. A child's delete cannot overtake its own fork request (the
        // child is deleted only once that request is acknowledged), so this is the creator's
        // user, deleted before its creation arrived: the creator gave up on it (its `remote()`
        // timed out). Remember it for the creation, should it still come.
        if fork.0.created_on != self.me {
            self.tombstones.insert(fork);
        }
        match self.owned.get_mut(&rref) {
            Some(owned) => {
                owned.awaiting_creation = false;
                self.maybe_drop(rref)
            }
            None => Vec::new(),
        }
    }

    fn maybe_drop(&mut self, rref: RRefId) -> Vec<Effect> {
        match self.owned.get(&rref) {
            Some(o) if o.forks.is_empty() && o.handles == 0 && !o.awaiting_creation => {
                self.owned.remove(&rref);
                vec![Effect::DropValue(rref)]
            }
            _ => Vec::new(),
        }
    }

    // ---- forking (either side) ----

    /// This worker serializes a reference to `rref` (owned by `owner`) into a message, to any
    /// worker, itself included. `from` is the sending user (`None` if this worker is the owner).
    /// Returns the child's fork id.
    pub fn fork_sent(
        &mut self,
        rref: RRefId,
        owner: u32,
        from: Option<ForkId>,
    ) -> Result<ForkId, LedgerError> {
        let child = ForkId(self.next_id());
        match from {
            None => {
                if owner != self.me || !self.owned.contains_key(&rref) {
                    return Err(violation(format!(
                        "forking {:?} as owner, but it is not owned here",
                        rref.0
                    )));
                }
                // Early fork registration: the owner knows the child before it exists. Even a
                // send to itself registers one, which holds the value while the message is in
                // flight; it is removed when the message arrives.
                self.owned.entry(rref).or_default().forks.insert(child);
            }
            Some(parent) => {
                let user = self.users.get_mut(&parent).ok_or_else(|| {
                    violation(format!("forking from an unknown user {:?}", parent.0))
                })?;
                user.pending_children += 1;
                self.pending_children.insert(child, parent);
            }
        }
        Ok(child)
    }

    /// A serialized reference arrived here from `parent`. Returns the effects, and whether the
    /// result is an owner handle (this worker owns the value) or a user reference.
    pub fn fork_received(
        &mut self,
        rref: RRefId,
        owner: u32,
        child: ForkId,
        parent: u32,
    ) -> Vec<Effect> {
        if owner == self.me {
            // user→owner or owner→self: the value gets a local handle, and no fork remains.
            let me = self.me;
            let owned = self.owned_ahead(rref);
            owned.handles += 1;
            return if parent == me {
                // Our own send to self: drop the fork registered when it was sent.
                owned.forks.remove(&child);
                Vec::new()
            } else {
                vec![Effect::Send {
                    to: parent,
                    msg: Control::ChildAccept { fork: child },
                }]
            };
        }
        let confirmed = parent == owner;
        self.users.insert(
            child,
            User {
                rref,
                owner,
                parent: (!confirmed).then_some(parent),
                confirmed,
                handles: 1,
                pending_children: 0,
            },
        );
        if confirmed {
            vec![Effect::Confirmed(child)]
        } else {
            vec![Effect::Send {
                to: owner,
                msg: Control::ForkRequest { rref, fork: child },
            }]
        }
    }

    /// The owner acknowledged the fork request of `child`.
    pub fn fork_acked(&mut self, child: ForkId) -> Vec<Effect> {
        let Some(user) = self.users.get_mut(&child) else {
            return Vec::new();
        };
        if user.confirmed {
            return Vec::new();
        }
        user.confirmed = true;
        let mut effects = vec![Effect::Confirmed(child)];
        if let Some(parent) = user.parent.take() {
            effects.push(Effect::Send {
                to: parent,
                msg: Control::ChildAccept { fork: child },
            });
        }
        effects.extend(self.maybe_delete_user(child));
        effects
    }

    /// A child this worker forked was accepted (idempotent).
    pub fn child_accepted(&mut self, child: ForkId) -> Vec<Effect> {
        let Some(parent) = self.pending_children.remove(&child) else {
            return Vec::new();
        };
        if let Some(user) = self.users.get_mut(&parent) {
            user.pending_children = user.pending_children.saturating_sub(1);
        }
        self.maybe_delete_user(parent)
    }

    // ---- user side ----

    /// `remote()` made a user reference here for a value `owner` will create.
    pub fn user_created(&mut self, rref: RRefId, fork: ForkId, owner: u32) {
        self.users.insert(
            fork,
            User {
                rref,
                owner,
                parent: None,
                confirmed: false,
                handles: 1,
                pending_children: 0,
            },
        );
    }

    /// The owner confirmed the creator's user (the remote call's acknowledgement).
    pub fn user_confirmed(&mut self, fork: ForkId) -> Vec<Effect> {
        let Some(user) = self.users.get_mut(&fork) else {
            return Vec::new();
        };
        if user.confirmed {
            return Vec::new();
        }
        user.confirmed = true;
        let mut effects = vec![Effect::Confirmed(fork)];
        effects.extend(self.maybe_delete_user(fork));
        effects
    }

    /// Another local handle to a user reference.
    pub fn user_handle_added(&mut self, fork: ForkId) {
        if let Some(u) = self.users.get_mut(&fork) {
            u.handles += 1;
        }
    }

    /// A local handle to a user reference was dropped. When the last one goes, the owner is told
    /// — at once if the user is confirmed and has no pending child, otherwise once it is.
    pub fn user_dropped(&mut self, fork: ForkId) -> Vec<Effect> {
        if let Some(u) = self.users.get_mut(&fork) {
            u.handles = u.handles.saturating_sub(1);
        }
        self.maybe_delete_user(fork)
    }

    /// User references the application still holds (with their values), for leak reports.
    pub fn held_users(&self) -> Vec<(RRefId, ForkId)> {
        let mut held: Vec<_> = self
            .users
            .iter()
            .filter(|(_, u)| u.handles > 0)
            .map(|(f, u)| (u.rref, *f))
            .collect();
        held.sort();
        held
    }

    /// Shutdown: every user reference here is deleted, whatever local handles remain (torch's
    /// `_delete_all_user_and_unforked_owner_rrefs`). Users not yet confirmed, or with children
    /// not yet accepted, are deleted as soon as they are.
    pub fn delete_all_users(&mut self) -> Vec<Effect> {
        let forks: Vec<ForkId> = self.users.keys().copied().collect();
        let mut effects = Vec::new();
        for fork in forks {
            if let Some(u) = self.users.get_mut(&fork) {
                u.handles = 0;
            }
            effects.extend(self.maybe_delete_user(fork));
        }
        effects
    }

    /// The owner will never answer for this user (its creation failed or timed out, or the
    /// owner is gone): forget it without telling the owner.
    pub fn user_abandoned(&mut self, fork: ForkId) {
        self.users.remove(&fork);
    }

    fn maybe_delete_user(&mut self, fork: ForkId) -> Vec<Effect> {
        match self.users.get(&fork) {
            Some(u) if u.handles == 0 && u.confirmed && u.pending_children == 0 => {
                let (rref, owner) = (u.rref, u.owner);
                self.users.remove(&fork);
                vec![Effect::Send {
                    to: owner,
                    msg: Control::UserDelete { rref, fork },
                }]
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u32 = 0;
    const B: u32 = 1;
    const C: u32 = 2; // the owner in every flow

    fn send(to: u32, msg: Control) -> Effect {
        Effect::Send { to, msg }
    }

    /// `remote()` from A to C: A's user and C's owner value, confirmed by the remote result.
    fn created() -> (Ledger, Ledger, RRefId, ForkId) {
        let mut a = Ledger::new(A);
        let mut c = Ledger::new(C);
        let rref = RRefId(a.next_id());
        let fork = ForkId(a.next_id());
        a.user_created(rref, fork, C);
        assert_eq!(c.owner_created(rref, Some(fork)), vec![]);
        assert_eq!(a.user_confirmed(fork), vec![Effect::Confirmed(fork)]);
        (a, c, rref, fork)
    }

    #[test]
    fn create_then_delete() {
        let (mut a, mut c, rref, fork) = created();
        assert_eq!(c.info().num_forks, 1);
        assert_eq!(
            a.user_dropped(fork),
            vec![send(C, Control::UserDelete { rref, fork })]
        );
        assert_eq!(c.user_delete(rref, fork), vec![Effect::DropValue(rref)]);
        // A retried delete changes nothing.
        assert_eq!(c.user_delete(rref, fork), vec![]);
        assert_eq!(c.info(), LedgerInfo::default());
        assert_eq!(a.info(), LedgerInfo::default());
    }

    #[test]
    fn delete_before_confirmation_waits_for_it() {
        let mut a = Ledger::new(A);
        let rref = RRefId(a.next_id());
        let fork = ForkId(a.next_id());
        a.user_created(rref, fork, C);
        assert_eq!(
            a.user_dropped(fork),
            vec![],
            "an unconfirmed user is not deleted yet"
        );
        assert_eq!(a.info().num_pending_users, 1);
        assert_eq!(
            a.user_confirmed(fork),
            vec![
                Effect::Confirmed(fork),
                send(C, Control::UserDelete { rref, fork })
            ]
        );
    }

    #[test]
    fn fork_user_to_user() {
        let (mut a, mut c, rref, parent) = created();
        let mut b = Ledger::new(B);
        let child = a.fork_sent(rref, C, Some(parent)).unwrap();
        // A drops its handle right away: G2 keeps the parent until the child is accepted.
        assert_eq!(a.user_dropped(parent), vec![]);
        assert_eq!(
            b.fork_received(rref, C, child, A),
            vec![send(C, Control::ForkRequest { rref, fork: child })]
        );
        assert_eq!(b.info().num_pending_users, 1);
        c.fork_request(rref, child);
        c.fork_request(rref, child); // retried: idempotent
        assert_eq!(c.info().num_forks, 2);
        assert_eq!(
            b.fork_acked(child),
            vec![
                Effect::Confirmed(child),
                send(A, Control::ChildAccept { fork: child })
            ]
        );
        assert_eq!(
            a.child_accepted(child),
            vec![send(C, Control::UserDelete { rref, fork: parent })]
        );
        assert_eq!(
            a.child_accepted(child),
            vec![],
            "a retried accept changes nothing"
        );
        assert_eq!(c.user_delete(rref, parent), vec![]);
        assert_eq!(
            b.user_dropped(child),
            vec![send(C, Control::UserDelete { rref, fork: child })]
        );
        assert_eq!(c.user_delete(rref, child), vec![Effect::DropValue(rref)]);
    }

    #[test]
    fn fork_user_to_owner() {
        let (mut a, mut c, rref, parent) = created();
        let child = a.fork_sent(rref, C, Some(parent)).unwrap();
        assert_eq!(a.user_dropped(parent), vec![]);
        // The owner gets a local handle, adds no fork, and releases the parent.
        assert_eq!(
            c.fork_received(rref, C, child, A),
            vec![send(A, Control::ChildAccept { fork: child })]
        );
        assert_eq!(c.info().num_forks, 1);
        assert_eq!(
            a.child_accepted(child),
            vec![send(C, Control::UserDelete { rref, fork: parent })]
        );
        assert_eq!(
            c.user_delete(rref, parent),
            vec![],
            "the owner's local handle keeps the value"
        );
        assert_eq!(c.owner_handle_dropped(rref), vec![Effect::DropValue(rref)]);
    }

    #[test]
    fn fork_from_owner() {
        let mut c = Ledger::new(C);
        let mut b = Ledger::new(B);
        let rref = RRefId(c.next_id());
        c.owner_created(rref, None);
        let child = c.fork_sent(rref, C, None).unwrap();
        assert_eq!(c.info().num_forks, 1, "early fork registration");
        assert_eq!(
            c.owner_handle_dropped(rref),
            vec![],
            "the fork keeps the value"
        );
        assert_eq!(
            b.fork_received(rref, C, child, C),
            vec![Effect::Confirmed(child)]
        );
        assert!(b.is_confirmed(child));
        assert_eq!(
            b.user_dropped(child),
            vec![send(C, Control::UserDelete { rref, fork: child })]
        );
        assert_eq!(c.user_delete(rref, child), vec![Effect::DropValue(rref)]);
    }

    #[test]
    fn owner_sends_to_itself() {
        let mut c = Ledger::new(C);
        let rref = RRefId(c.next_id());
        c.owner_created(rref, None);
        let child = c.fork_sent(rref, C, None).unwrap();
        // The sender drops its handle while the message is in flight: the fork holds the value.
        assert_eq!(c.owner_handle_dropped(rref), vec![]);
        assert_eq!(c.fork_received(rref, C, child, C), vec![]);
        assert_eq!(c.info().num_forks, 0);
        assert_eq!(c.owner_handle_dropped(rref), vec![Effect::DropValue(rref)]);
    }

    #[test]
    fn child_dropped_before_its_fork_is_acked() {
        let (mut a, mut c, rref, parent) = created();
        let mut b = Ledger::new(B);
        let child = a.fork_sent(rref, C, Some(parent)).unwrap();
        let _ = b.fork_received(rref, C, child, A);
        assert_eq!(b.user_dropped(child), vec![], "not confirmed yet");
        c.fork_request(rref, child);
        assert_eq!(
            b.fork_acked(child),
            vec![
                Effect::Confirmed(child),
                send(A, Control::ChildAccept { fork: child }),
                send(C, Control::UserDelete { rref, fork: child }),
            ]
        );
    }

    /// A simulated world: three workers, values owned by C, handles created, forked and dropped
    /// at random, every message delivered in a random order (no ordering between any pair, as
    /// torch assumes).
    mod simulation {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Msg {
            Control {
                from: u32,
                to: u32,
                msg: Control,
            },
            /// A serialized reference on its way to `to`.
            Fork {
                to: u32,
                rref: RRefId,
                child: ForkId,
                parent: u32,
            },
            /// A remote call on its way to the owner.
            Create {
                rref: RRefId,
                fork: ForkId,
                creator: u32,
            },
            /// The owner's answer to a remote call.
            RemoteResult {
                to: u32,
                fork: ForkId,
            },
            /// The owner's acknowledgement of a fork request.
            ForkAck {
                to: u32,
                child: ForkId,
            },
        }

        #[derive(Debug, Clone, Copy, PartialEq)]
        enum Handle {
            User(u32, RRefId, ForkId),
            Owner(RRefId),
        }

        #[derive(Debug, Clone)]
        enum Op {
            Create(u32),
            Fork(prop::sample::Index, u32),
            Drop(prop::sample::Index),
            Deliver(prop::sample::Index),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0..2u32).prop_map(Op::Create),
                (any::<prop::sample::Index>(), 0..3u32).prop_map(|(i, to)| Op::Fork(i, to)),
                any::<prop::sample::Index>().prop_map(Op::Drop),
                any::<prop::sample::Index>().prop_map(Op::Deliver),
                any::<prop::sample::Index>().prop_map(Op::Deliver),
            ]
        }

        struct World {
            ledgers: Vec<Ledger>,
            handles: Vec<Handle>,
            inflight: Vec<Msg>,
            dropped: Vec<RRefId>,
        }

        impl World {
            fn apply(&mut self, at: u32, effects: Vec<Effect>) {
                for e in effects {
                    match e {
                        Effect::Send { to, msg } => {
                            self.inflight.push(Msg::Control { from: at, to, msg })
                        }
                        Effect::DropValue(rref) => {
                            let referenced = self.handles.iter().any(|h| match h {
                                Handle::User(_, r, _) | Handle::Owner(r) => *r == rref,
                            }) || self
                                .inflight
                                .iter()
                                .any(|m| matches!(m, Msg::Fork { rref: r, .. } if *r == rref));
                            assert!(
                                !referenced,
                                "{rref:?} dropped on {at} while still referenced"
                            );
                            assert!(!self.dropped.contains(&rref), "{rref:?} dropped twice");
                            self.dropped.push(rref);
                        }
                        Effect::Confirmed(_) => {}
                    }
                }
            }

            fn deliver(&mut self, m: Msg) {
                match m {
                    Msg::Control { from, to, msg } => {
                        let l = &mut self.ledgers[to as usize];
                        let effects = match msg {
                            Control::ForkRequest { rref, fork } => {
                                l.fork_request(rref, fork);
                                // The acknowledgement is the reply to the child's request.
                                self.inflight.push(Msg::ForkAck {
                                    to: from,
                                    child: fork,
                                });
                                vec![]
                            }
                            Control::ChildAccept { fork } => l.child_accepted(fork),
                            Control::UserDelete { rref, fork } => l.user_delete(rref, fork),
                        };
                        self.apply(to, effects);
                    }
                    Msg::Fork {
                        to,
                        rref,
                        child,
                        parent,
                    } => {
                        let effects =
                            self.ledgers[to as usize].fork_received(rref, C, child, parent);
                        self.handles.push(if to == C {
                            Handle::Owner(rref)
                        } else {
                            Handle::User(to, rref, child)
                        });
                        self.apply(to, effects);
                    }
                    Msg::Create {
                        rref,
                        fork,
                        creator,
                    } => {
                        let effects = self.ledgers[C as usize].owner_created(rref, Some(fork));
                        self.inflight.push(Msg::RemoteResult { to: creator, fork });
                        self.apply(C, effects);
                    }
                    Msg::RemoteResult { to, fork } => {
                        let effects = self.ledgers[to as usize].user_confirmed(fork);
                        self.apply(to, effects);
                    }
                    Msg::ForkAck { to, child } => {
                        let effects = self.ledgers[to as usize].fork_acked(child);
                        self.apply(to, effects);
                    }
                }
            }

            fn drop_handle(&mut self, h: Handle) {
                let (at, effects) = match h {
                    Handle::User(w, _, fork) => (w, self.ledgers[w as usize].user_dropped(fork)),
                    Handle::Owner(rref) => (C, self.ledgers[C as usize].owner_handle_dropped(rref)),
                };
                self.apply(at, effects);
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(400))]
            #[test]
            fn nothing_freed_early_and_everything_freed_at_the_end(ops in proptest::collection::vec(op(), 1..120)) {
                let mut w = World {
                    ledgers: (0..3).map(Ledger::new).collect(),
                    handles: Vec::new(),
                    inflight: Vec::new(),
                    dropped: Vec::new(),
                };
                let mut created = Vec::new();
                for op in ops {
                    match op {
                        Op::Create(at) => {
                            let rref = RRefId(w.ledgers[at as usize].next_id());
                            let fork = ForkId(w.ledgers[at as usize].next_id());
                            w.ledgers[at as usize].user_created(rref, fork, C);
                            w.handles.push(Handle::User(at, rref, fork));
                            // The remote call itself travels too: it may arrive late.
                            w.inflight.push(Msg::Create { rref, fork, creator: at });
                            created.push(rref);
                        }
                        Op::Fork(i, to) if !w.handles.is_empty() => {
                            let h = w.handles[i.index(w.handles.len())];
                            let (from_worker, rref, from) = match h {
                                Handle::User(wk, r, f) => (wk, r, Some(f)),
                                Handle::Owner(r) => (C, r, None),
                            };
                            let child = w.ledgers[from_worker as usize].fork_sent(rref, C, from).unwrap();
                            w.inflight.push(Msg::Fork { to, rref, child, parent: from_worker });
                        }
                        Op::Drop(i) if !w.handles.is_empty() => {
                            let h = w.handles.swap_remove(i.index(w.handles.len()));
                            w.drop_handle(h);
                        }
                        Op::Deliver(i) if !w.inflight.is_empty() => {
                            let m = w.inflight.swap_remove(i.index(w.inflight.len()));
                            w.deliver(m);
                        }
                        _ => {}
                    }
                }
                // Drain: deliver everything, drop every handle, deliver again.
                while !w.inflight.is_empty() || !w.handles.is_empty() {
                    if let Some(m) = w.inflight.pop() {
                        w.deliver(m);
                    } else if let Some(h) = w.handles.pop() {
                        w.drop_handle(h);
                    }
                }
                created.sort();
                w.dropped.sort();
                prop_assert_eq!(&w.dropped, &created, "every value is freed exactly once");
                for l in &w.ledgers {
                    prop_assert_eq!(l.info(), LedgerInfo::default());
                }
            }
        }
    }

    #[test]
    fn a_delete_that_overtakes_a_delayed_creation() {
        let mut a = Ledger::new(A);
        let mut c = Ledger::new(C);
        let rref = RRefId(a.next_id());
        let fork = ForkId(a.next_id());
        a.user_created(rref, fork, C);
        // The remote call timed out on A, which then dropped its reference.
        let _ = a.user_confirmed(fork);
        assert_eq!(
            a.user_dropped(fork),
            vec![send(C, Control::UserDelete { rref, fork })]
        );
        assert_eq!(c.user_delete(rref, fork), vec![], "nothing to delete yet");
        assert_eq!(
            c.owner_created(rref, Some(fork)),
            vec![Effect::DropValue(rref)],
            "the late value goes at once"
        );
        assert_eq!(c.info(), LedgerInfo::default());
    }

    /// A reference made on A by `remote()`, its creator's fork, and a child forked from it.
    fn made_on_a() -> (RRefId, ForkId, ForkId) {
        let id = |n| GlobalId {
            created_on: A,
            local_id: n,
        };
        (RRefId(id(1)), ForkId(id(2)), ForkId(id(3)))
    }

    #[test]
    fn a_fork_request_that_overtakes_the_creation() {
        let mut c = Ledger::new(C);
        let (rref, creator, child) = made_on_a();
        c.fork_request(rref, child);
        // The child is done before the creation arrives: the entry must wait for the creator.
        assert_eq!(c.user_delete(rref, child), vec![]);
        assert_eq!(c.owner_created(rref, Some(creator)), vec![]);
        assert_eq!(c.info().num_forks, 1);
        assert_eq!(c.user_delete(rref, creator), vec![Effect::DropValue(rref)]);
    }

    #[test]
    fn a_creator_that_gives_up_before_its_creation_arrives() {
        let mut c = Ledger::new(C);
        let (rref, creator, child) = made_on_a();
        c.fork_request(rref, child);
        assert_eq!(c.user_delete(rref, child), vec![]);
        // The creator's remote() timed out and it deleted its user: nothing waits any more.
        assert_eq!(c.user_delete(rref, creator), vec![Effect::DropValue(rref)]);
        // The creation comes after all: the value goes at once.
        assert_eq!(
            c.owner_created(rref, Some(creator)),
            vec![Effect::DropValue(rref)]
        );
        assert_eq!(c.info(), LedgerInfo::default());
    }

    #[test]
    fn protocol_violations_are_errors() {
        let mut c = Ledger::new(C);
        let rref = RRefId(GlobalId {
            created_on: A,
            local_id: 9,
        });
        assert!(c.fork_sent(rref, C, None).is_err());
        assert!(c.fork_sent(rref, C, Some(ForkId(rref.0))).is_err());
    }
}
