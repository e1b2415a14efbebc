//! Drain and weight requests and their refusals.
use super::*;

#[test]
fn drain_and_weight_move_through_the_table_and_refusals_name_what_exists() {
    let mut h = Harness::with(service("workers = 2"));
    let ask = |command| Event::Control {
        command,
        reply: ReplyTo(1),
    };
    let drain = |slot| {
        ask(Command::Drain {
            service: "dns".into(),
            slot,
        })
    };
    let actions = h.feed_table_ok(drain(0), 32768);
    assert_eq!(table_ops(&actions), vec![TableOp::Drain(0)]);
    assert!(
        matches!(replies(&actions)[..], [Reply::Done { moved: 32768, ref message }] if message.contains("32768 entries moved"))
    );
    let again = h.feed(drain(0));
    assert!(
        matches!(replies(&again)[..], [Reply::Error { ref message, .. }] if message.contains("already draining"))
    );
    let last = h.feed(drain(1));
    assert!(
        matches!(replies(&last)[..], [Reply::Error { ref message, .. }] if message.contains("only slot taking new work"))
    );
    let actions = h.feed_table_ok(
        ask(Command::Weight {
            service: "dns".into(),
            slot: 0,
            weight: 5,
        }),
        100,
    );
    assert_eq!(
        table_ops(&actions),
        vec![TableOp::Admit { slot: 0, weight: 5 }]
    );
    let unknown = h.feed(ask(Command::Drain {
        service: "web".into(),
        slot: 0,
    }));
    assert!(
        matches!(replies(&unknown)[..], [Reply::Error { ref message, .. }] if message.contains("this daemon serves dns"))
    );
    let empty = h.feed(drain(7));
    assert!(
        matches!(replies(&empty)[..], [Reply::Error { ref message, .. }] if message.contains("slots [0, 1]"))
    );
    let out_of_range = h.feed(drain(600));
    assert!(
        matches!(replies(&out_of_range)[..], [Reply::Error { ref message, .. }] if message.contains("0 to 511"))
    );
}

#[test]
fn a_refused_weight_leaves_the_membership_as_it_was() {
    let mut h = Harness::with(service("workers = 2"));
    let actions = h.feed(Event::Control {
        command: Command::Weight {
            service: "dns".into(),
            slot: 1,
            weight: 0,
        },
        reply: ReplyTo(1),
    });
    let ticket = first_ticket(&actions);
    let actions = h.feed(Event::TableDone {
        ticket,
        result: Err("weight 0 is out of range".into()),
    });
    assert!(matches!(replies(&actions)[..], [Reply::Error { .. }]));
    assert_eq!(h.sup.services[0].members, [(0, 1), (1, 1)].into());
}
