//! The ledger's flows, message by message, and a random-order property test.

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
    let child = a.fork_sent(rref, C, Some(parent), None).unwrap();
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
    let child = a.fork_sent(rref, C, Some(parent), None).unwrap();
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
    let child = c.fork_sent(rref, C, None, None).unwrap();
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
    let child = c.fork_sent(rref, C, None, None).unwrap();
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
    let child = a.fork_sent(rref, C, Some(parent), None).unwrap();
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
                    let effects = self.ledgers[to as usize].fork_received(rref, C, child, parent);
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
                        let child = w.ledgers[from_worker as usize].fork_sent(rref, C, from, None).unwrap();
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
    assert!(c.fork_sent(rref, C, None, None).is_err());
    assert!(c.fork_sent(rref, C, Some(ForkId(rref.0)), None).is_err());
}

/// Only the worker holding a fork may delete it, where the owner knows who holds it; a fork
/// the owner never saw only the worker that made it.
#[test]
fn deletes_are_admitted_only_from_the_fork_holder() {
    let (_a, mut c, rref, fork) = created();
    let delete = Control::UserDelete { rref, fork };
    assert!(c.admit(&delete, B).is_err(), "B does not hold A's fork");
    assert!(c.admit(&delete, A).is_ok());

    // A child that asked for its fork holds it.
    let child = ForkId(GlobalId {
        created_on: A,
        local_id: 99,
    });
    let request = Control::ForkRequest { rref, fork: child };
    c.admit(&request, B).unwrap();
    c.fork_request(rref, child);
    let delete = Control::UserDelete { rref, fork: child };
    assert!(
        c.admit(&delete, A).is_err(),
        "A made the fork but B holds it"
    );
    assert!(c.admit(&delete, B).is_ok());

    // A fork never seen here: only its maker may give it up.
    let unseen = ForkId(GlobalId {
        created_on: B,
        local_id: 7,
    });
    let delete = Control::UserDelete { rref, fork: unseen };
    assert!(c.admit(&delete, A).is_err());
    assert!(c.admit(&delete, B).is_ok());
}

/// A fork the owner sends is deleted only by the worker it went to; a child a user forked is
/// accepted only by the worker it went to, or by the owner.
#[test]
fn forks_sent_to_a_known_worker_are_theirs() {
    let (mut a, mut c, rref, parent) = created();
    let child = c.fork_sent(rref, C, None, Some(B)).unwrap();
    let delete = Control::UserDelete { rref, fork: child };
    assert!(c.admit(&delete, A).is_err(), "the owner sent it to B");
    assert!(c.admit(&delete, B).is_ok());

    let grandchild = a.fork_sent(rref, C, Some(parent), Some(B)).unwrap();
    let accept = Control::ChildAccept { fork: grandchild };
    assert!(a.admit(&accept, A).is_err(), "A sent it to B");
    assert!(a.admit(&accept, B).is_ok(), "the child");
    assert!(a.admit(&accept, C).is_ok(), "the owner");
}

/// Messages about values not created yet, or users never seen, make at most MAX_AHEAD entries.
#[test]
fn entries_made_ahead_are_bounded() {
    let mut c = Ledger::new(C);
    let id = |n: u64| GlobalId {
        created_on: A,
        local_id: n,
    };
    for n in 0..MAX_AHEAD as u64 {
        let request = Control::ForkRequest {
            rref: RRefId(id(2 * n)),
            fork: ForkId(id(2 * n + 1)),
        };
        c.admit(&request, B).unwrap();
        c.fork_request(RRefId(id(2 * n)), ForkId(id(2 * n + 1)));
    }
    let one_more = Control::ForkRequest {
        rref: RRefId(id(u64::MAX - 1)),
        fork: ForkId(id(u64::MAX)),
    };
    assert!(c.admit(&one_more, B).is_err());
    // A creation that arrives makes room again.
    assert_eq!(c.owner_created(RRefId(id(0)), None), vec![]);
    assert!(c.admit(&one_more, B).is_ok());
}
