//! The auditor as `scripts/dev up` starts it: the binary with `examples/dev/auditor.toml`,
//! against a nats-server enforcing the repo's `nats/auth.conf`, so the dev config and the
//! auditor user's permissions are proven to carry indexing, dead-lettering and search.

use std::process::{Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use herald_test_support::{
    NatsServer, OpenSearchServer, eventually_async, free_port, service_password, workspace_root,
};
use serde_json::{Value, json};

const DEV_TOKEN: &str = "dev-audit-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_config_indexes_and_dead_letters_as_the_auditor_user() {
    let nats = NatsServer::start_with_service_users();
    let osmem = OpenSearchServer::start();
    let (admin, api) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald-auditor"))
        .arg("--config")
        .arg(workspace_root().join("examples/dev/auditor.toml"))
        .env("HERALD_NATS__URL", nats.url())
        .env("HERALD_SERVICE__CLUSTER_URL", osmem.url())
        .env("HERALD_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
        .env("HERALD_SERVICE__API_LISTEN", format!("127.0.0.1:{api}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start herald-auditor");
    let http = reqwest::Client::new();
    eventually_async("/ready", Duration::from_secs(30), || async {
        let r = http
            .get(format!("http://127.0.0.1:{admin}/ready"))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;

    let gateway = async_nats::ConnectOptions::new()
        .user_and_password("gateway".into(), service_password("gateway"))
        .connect(nats.url())
        .await
        .expect("connect as gateway");
    let js = jetstream::new(gateway);
    let id = uuid::Uuid::now_v7();
    let good = json!({"id": id, "entity": "Order", "op": "insert", "key": "1", "data": {"id": 1},
        "before": null, "changed": null, "at": chrono::Utc::now(), "actor": null, "tx": 1,
        "schema_version": 1});
    for body in [good.to_string(), "{not json".to_owned()] {
        js.publish("herald.events.Order.insert", body.into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let hits = eventually_async(
        "an event and a dead letter",
        Duration::from_secs(30),
        || async {
            let answer: Value = http
                .get(format!("http://127.0.0.1:{api}/v1/search"))
                .bearer_auth(DEV_TOKEN)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let hits = answer["hits"].as_array()?.clone();
            (hits.len() == 2).then_some(hits)
        },
    )
    .await;
    let types: Vec<&str> = hits.iter().filter_map(|h| h["type"].as_str()).collect();
    assert!(
        types.contains(&"event") && types.contains(&"dead_letter"),
        "{hits:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
