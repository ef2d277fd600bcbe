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
    /// user, which must stay alive until then (G2), and the worker the child went to, if known
    /// (only it, or the owner, accepts the child). Forks from the owner need no such hold: the
    /// owner registers them when it sends them.
    pending_children: HashMap<ForkId, (ForkId, Option<u32>)>,
    /// Users deleted before the owner saw their creation (a delayed `remote()`): the creation,
    /// when it comes, must not keep the value for them.
    tombstones: HashSet<ForkId>,
    /// The worker holding each fork of an owned value, where the owner learnt it (the creator
    /// of a `remote()`, a child's fork request): only that worker may delete the fork.
    holders: HashMap<ForkId, u32>,
    /// Owned entries a message registered ahead of their creation (still waiting for it).
    awaiting: usize,
}

/// The most entries messages may make ahead of what they refer to — values announced before
/// their creation, deletes of users never seen — so that a peer cannot grow the ledger
/// without bound.
pub const MAX_AHEAD: usize = 1 << 16;

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
            holders: HashMap::new(),
            awaiting: 0,
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
        if std::mem::take(&mut owned.awaiting_creation) {
            self.awaiting -= 1;
        }
        match creator_fork {
            Some(f) if self.tombstones.remove(&f) => return self.maybe_drop(rref),
            Some(f) => {
                owned.forks.insert(f);
                // The creator made its user's id.
                self.holders.insert(f, f.0.created_on);
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

    /// Whether `msg` may come from worker `from`: a fork is deleted only by the worker that
    /// holds it, when the owner knows who that is (the creator of a `remote()`, the worker the
    /// owner sent it to, a child that asked for it), and a delete of a fork the owner has never
    /// seen only by the worker that made it (the creator giving up before its creation
    /// arrived); a child is accepted only by the worker it went to, or the owner. Records who
    /// asked for a fork.
    pub fn admit(&mut self, msg: &Control, from: u32) -> Result<(), LedgerError> {
        match *msg {
            Control::ForkRequest { rref, fork } => {
                if !self.owned.contains_key(&rref) && self.awaiting >= MAX_AHEAD {
                    return Err(violation(format!(
                        "{MAX_AHEAD} references already wait for their creation; {} refused",
                        rref.0
                    )));
                }
                self.holders.insert(fork, from);
                Ok(())
            }
            Control::UserDelete { rref, fork } => {
                let known = self
                    .owned
                    .get(&rref)
                    .is_some_and(|o| o.forks.contains(&fork));
                let allowed = match self.holders.get(&fork) {
                    Some(&holder) => holder == from,
                    None => known || fork.0.created_on == from,
                };
                if !allowed {
                    return Err(violation(format!(
                        "worker {from} may not delete fork {} of {}",
                        fork.0, rref.0
                    )));
                }
                if !known && self.tombstones.len() >= MAX_AHEAD {
                    return Err(violation(format!(
                        "{MAX_AHEAD} deletes of unseen users already wait; {} refused",
                        fork.0
                    )));
                }
                if known {
                    self.holders.remove(&fork);
                }
                Ok(())
            }
            Control::ChildAccept { fork } => match self.pending_children.get(&fork) {
                // From the child, or from the owner (a fork sent to the owner itself).
                Some(&(parent, Some(to)))
                    if to != from && self.users.get(&parent).is_some_and(|u| u.owner != from) =>
                {
                    Err(violation(format!(
                        "worker {from} may not accept child {}, sent to worker {to}",
                        fork.0
                    )))
                }
                _ => Ok(()),
            },
        }
    }

    /// The entry of an owned value, registering it if a message about it overtook its creation
    /// (a value made elsewhere by `remote()`): it then waits for that creation.
    fn owned_ahead(&mut self, rref: RRefId) -> &mut Owned {
        let me = self.me;
        let awaiting = &mut self.awaiting;
        self.owned.entry(rref).or_insert_with(|| {
            let ahead = rref.0.created_on != me;
            *awaiting += usize::from(ahead);
            Owned {
                awaiting_creation: ahead,
                ..Owned::default()
            }
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
                if std::mem::take(&mut owned.awaiting_creation) {
                    self.awaiting -= 1;
                }
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

    /// This worker serializes a reference to `rref` (owned by `owner`) into a message to
    /// worker `to` (if known), itself included. `from` is the sending user (`None` if this
    /// worker is the owner). Returns the child's fork id.
    pub fn fork_sent(
        &mut self,
        rref: RRefId,
        owner: u32,
        from: Option<ForkId>,
        to: Option<u32>,
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
                if let Some(to) = to {
                    self.holders.insert(child, to);
                }
            }
            Some(parent) => {
                let user = self.users.get_mut(&parent).ok_or_else(|| {
                    violation(format!("forking from an unknown user {:?}", parent.0))
                })?;
                user.pending_children += 1;
                self.pending_children.insert(child, (parent, to));
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
        let Some((parent, _)) = self.pending_children.remove(&child) else {
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
mod tests;
