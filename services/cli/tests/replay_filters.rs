//! `herald dlq replay --all` with filters: only the dead letters matching every filter are
//! replayed, and `--dry-run` shows that selection without replaying anything.

mod common;

use common::*;
use herald_shared::subjects::{ACTIONS_STREAM, DLQ_STREAM, DlqSource};
use herald_test_support::NatsServer;

#[tokio::test]
async fn replay_takes_only_what_every_filter_admits_and_a_dry_run_takes_nothing() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    let letters = [
        (
            "herald.actions.webhook.order_created",
            "w1",
            "receiver answered 410 Gone",
        ),
        (
            "herald.actions.webhook.order_paid",
            "w2",
            "receiver answered 500",
        ),
        (
            "herald.actions.slack.order_shipped",
            "s1",
            "slack answered 410 Gone",
        ),
    ];
    for (subject, msg_id, error) in letters {
        dead_letter(&js, DlqSource::Actions, subject, msg_id, error, "{}", None).await;
    }
    let selection = [
        "dlq",
        "replay",
        "--all",
        "--subject",
        "herald.actions.webhook.>",
        "--error",
        "410",
    ];

    let dry = succeed(&nats.url(), &[&selection[..], &["--dry-run"]].concat()).await;
    assert_eq!(
        dry.lines().collect::<Vec<_>>(),
        ["would replay DLQ 1 to herald.actions.webhook.order_created (receiver answered 410 Gone)"]
    );
    assert_eq!(
        messages_in(&js, DLQ_STREAM).await,
        3,
        "a dry run replays nothing"
    );
    assert_eq!(messages_in(&js, ACTIONS_STREAM).await, 0);

    let outside = succeed(
        &nats.url(),
        &[&selection[..], &["--since", "2999-01-01T00:00:00Z"]].concat(),
    )
    .await;
    assert_eq!(outside.trim(), "no dead letters to replay");

    let replayed = succeed(&nats.url(), &selection).await;
    assert_eq!(replayed.lines().count(), 1, "{replayed}");
    assert_eq!(messages_in(&js, ACTIONS_STREAM).await, 1);
    let left = json_lines(&succeed(&nats.url(), &["dlq", "list", "--json"]).await);
    let kept: Vec<&str> = left
        .iter()
        .filter_map(|r| r["original_msg_id"].as_str())
        .collect();
    assert_eq!(kept, ["w2", "s1"]);
}

#[tokio::test]
async fn a_filter_without_all_or_with_a_bad_pattern_is_refused() {
    let nats = NatsServer::start();
    provisioned(&nats).await;
    for args in [
        &["dlq", "replay", "1", "--error", "410"][..],
        &["dlq", "replay", "--all", "--subject", "herald.act*"][..],
    ] {
        let refusal = fail(&nats.url(), args).await;
        assert!(!refusal.is_empty(), "{args:?} was refused without a reason");
    }
}
