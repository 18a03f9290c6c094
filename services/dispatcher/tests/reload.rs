mod common;

use std::process::Command;

use common::*;
use herald_shared::Op;
use herald_test_support::NatsServer;
use serde_json::json;

const ONE: &str = r#"
[[observer]]
name = "first"
entity = "Order"
ops = ["insert"]

[[observer.action]]
kind = "webhook"
url = "https://example.test/first"
"#;

const SECOND: &str = r#"
[[observer]]
name = "second"
entity = "Order"
ops = ["insert"]

[[observer.action]]
kind = "job"
queue = "default"
"#;

#[tokio::test]
async fn a_reload_adds_an_observer_without_losing_in_flight_work() {
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    let file = write_file(ONE);
    let app = App::spawn(&js, settings("dispatcher", file.path())).await;
    for n in 0..200 {
        publish_event(
            &js,
            &event("Order", Op::Insert, &(n % 7).to_string(), json!({"n": n})),
        )
        .await;
    }
    std::fs::write(file.path(), format!("{ONE}\n{SECOND}")).expect("rewrite");
    assert_eq!(app.observers.reload().expect("valid file"), 2);
    let after: Vec<_> = (0..50)
        .map(|n| {
            event(
                "Order",
                Op::Insert,
                &(n % 7).to_string(),
                json!({"n": 200 + n}),
            )
        })
        .collect();
    for e in &after {
        publish_event(&js, e).await;
    }
    wait_until_drained(&js, "dispatcher").await;
    app.stop().await;

    let requests = actions(&js).await;
    let counts = by_observer(&requests);
    assert_eq!(
        counts.get("first"),
        Some(&250),
        "every event got the first observer's action"
    );
    let second: std::collections::BTreeSet<_> = requests
        .iter()
        .filter(|r| r.observer == "second")
        .map(|r| r.event.id)
        .collect();
    for e in &after {
        assert!(
            second.contains(&e.id),
            "an event after the reload missed the new observer"
        );
    }
}

#[tokio::test]
async fn an_invalid_reload_keeps_the_observers_in_force() {
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    let file = write_file(ONE);
    let app = App::spawn(&js, settings("dispatcher", file.path())).await;
    std::fs::write(
        file.path(),
        ONE.replace("ops = [\"insert\"]", "ops = [\"upsert\"]"),
    )
    .expect("rewrite");
    let refused = app
        .observers
        .reload()
        .expect_err("invalid file")
        .to_string();
    assert!(refused.contains("line 5: observer[0].ops[0]"), "{refused}");
    publish_event(&js, &event("Order", Op::Insert, "1", json!({}))).await;
    wait_for_actions(&js, 1).await;
    assert_eq!(actions(&js).await[0].observer, "first");
    app.stop().await;
}

#[test]
fn an_invalid_observers_file_is_refused_at_start_naming_key_and_line() {
    let observers = write_file(&ONE.replace("kind = \"webhook\"", "kind = \"web.hook\""));
    let config = write_file(&format!(
        "[service]\nobservers = \"{}\"\n",
        observers.path().display()
    ));
    let output = Command::new(env!("CARGO_BIN_EXE_herald-dispatcher"))
        .arg("--config")
        .arg(config.path())
        .output()
        .expect("run herald-dispatcher");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("line 8: observer[0].action[0].kind"),
        "{stderr}"
    );
}

#[tokio::test]
async fn sighup_reloads_the_observers_file_of_a_running_dispatcher() {
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    let observers = write_file(ONE);
    let config = write_file(&format!(
        "[nats]\nurl = \"{}\"\n[telemetry]\nlog_level = \"warn\"\n[service]\nobservers = \"{}\"\n",
        nats.url(),
        observers.path().display()
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald-dispatcher"))
        .arg("--config")
        .arg(config.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start herald-dispatcher");
    publish_event(&js, &event("Order", Op::Insert, "1", json!({}))).await;
    wait_for_actions(&js, 1).await;

    std::fs::write(observers.path(), format!("{ONE}\n{SECOND}")).expect("rewrite");
    let hup = Command::new("kill")
        .arg("-HUP")
        .arg(child.id().to_string())
        .status()
        .expect("send SIGHUP");
    assert!(hup.success());
    // The reload is asynchronous: keep publishing until the new observer answers.
    herald_test_support::eventually_async("the new observer to act", WAIT, || async {
        publish_event(&js, &event("Order", Op::Insert, "1", json!({}))).await;
        let requests = actions(&js).await;
        requests
            .iter()
            .any(|r| r.observer == "second")
            .then_some(())
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
}
