//! The gateway as real GraphQL tooling sees it: graphql-js (what GraphiQL, Apollo Client,
//! Relay and graphql-codegen build on) reads the schema with its own introspection query under
//! the default limits, builds a client schema from it and validates fragment-heavy documents;
//! introspection and GraphiQL can each be switched off.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::World;
use serde_json::{Value, json};

/// npm `graphql` 16 (the line the client tools use), installed once into cargo's per-target
/// temp folder (ignored by git).
fn graphql_js() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("graphql-js");
    if !dir.join("node_modules/graphql/package.json").is_file() {
        std::fs::create_dir_all(&dir).expect("create the graphql-js folder");
        let status = Command::new("npm")
            .args([
                "install",
                "--no-save",
                "--no-package-lock",
                "--no-audit",
                "--no-fund",
                "--prefix",
            ])
            .arg(&dir)
            .arg("graphql@16")
            .status()
            .expect("npm runs");
        assert!(status.success(), "npm install graphql@16 failed");
    }
    dir
}

/// Runs `client.mjs` against `url` with `documents`; returns its report.
fn run_client(url: &str, documents: &Value) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/graphql-js/client.mjs");
    let mut child = Command::new("node")
        .arg(script)
        .arg(url)
        .env("GRAPHQL_JS_DIR", graphql_js())
        .env("GRAPHQL_API_KEY", common::API_KEY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(documents.to_string().as_bytes())
            .expect("write the documents");
    }
    let output = child.wait_with_output().expect("node finishes");
    assert!(
        output.status.success(),
        "client.mjs failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("a JSON report")
}

const DOCUMENTS: [(&str, &str); 4] = [
    (
        "the issue's fragment",
        "query Orders { orderList(limit: 1) { customer { id } ...OrderCustomer } }
         fragment OrderCustomer on Order { customer { name } }",
    ),
    (
        "Relay-style nested fragments and aliases",
        "query Customer($id: Int!) { customer(id: $id) { ...CustomerCard } }
         fragment CustomerCard on Customer { id name recent: orders(limit: 2, order_by: [{id: DESC}]) { ...OrderRow } }
         fragment OrderRow on Order { id status total customer { ...CustomerName } }
         fragment CustomerName on Customer { name }",
    ),
    (
        "inline fragments and directives",
        "query($withEmail: Boolean!) { customerList(order_by: [{id: ASC}], limit: 2) {
             __typename ... on Customer { id } ... @include(if: $withEmail) { email } name @skip(if: true) } }",
    ),
    (
        "a mutation document (validated only)",
        "mutation Create($input: OrderInput!) { createOrder(input: $input) { id ...on Order { status } } }",
    ),
];

#[tokio::test]
async fn graphql_js_reads_the_schema_under_default_limits_and_validates_fragment_documents() {
    let world = World::start().await;
    sqlx::raw_sql(
        "INSERT INTO customers (id, name, email) VALUES (1, 'Ada', 'ada@example.com'), (2, 'Bob', NULL);
         INSERT INTO orders (id, customer_id, status, total) VALUES
             (10, 1, 'paid', 12.50), (11, 1, 'new', 99.00);",
    )
    .execute(&world.db)
    .await
    .expect("seed");
    let gateway = world.gateway().await;
    let documents: Vec<Value> = DOCUMENTS
        .iter()
        .map(|(name, query)| {
            let variables = match *name {
                "Relay-style nested fragments and aliases" => json!({"id": 1}),
                "inline fragments and directives" => json!({"withEmail": true}),
                _ => json!({}),
            };
            json!({"query": query, "variables": variables})
        })
        .collect();
    // A mutation must not run here: it is validated, then refused for want of a caller.
    let report = tokio::task::spawn_blocking({
        let url = gateway.url.clone();
        move || run_client(&url, &Value::Array(documents))
    })
    .await
    .expect("the client ran");

    assert!(
        report["version"]
            .as_str()
            .unwrap_or_default()
            .starts_with("16."),
        "{report}"
    );
    assert_eq!(
        report["introspection"],
        json!({"default": null, "full": null}),
        "getIntrospectionQuery() answers without errors under the default limits"
    );
    let sdl = report["sdl"].as_str().unwrap_or_default();
    for expected in ["type Order {", "scalar Decimal", "input OrderWhere"] {
        assert!(sdl.contains(expected), "{expected} missing from:\n{sdl}");
    }
    for (i, (name, _)) in DOCUMENTS.iter().enumerate() {
        assert_eq!(
            report["documents"][i]["errors"],
            json!([]),
            "{name} validates against the client schema"
        );
    }
    let answers: Vec<&Value> = (0..3).map(|i| &report["documents"][i]["answer"]).collect();
    assert_eq!(
        answers[0],
        &json!({"data": {"orderList": [{"customer": {"id": 1, "name": "Ada"}}]}})
    );
    assert_eq!(
        answers[1],
        &json!({"data": {"customer": {"id": 1, "name": "Ada", "recent": [
            {"id": 11, "status": "new", "total": "99.00", "customer": {"name": "Ada"}},
            {"id": 10, "status": "paid", "total": "12.50", "customer": {"name": "Ada"}},
        ]}}})
    );
    assert_eq!(
        answers[2],
        &json!({"data": {"customerList": [
            {"__typename": "Customer", "id": 1, "email": "ada@example.com"},
            {"__typename": "Customer", "id": 2, "email": null},
        ]}})
    );
    let refused = &report["documents"][3]["answer"];
    assert!(refused["errors"][0]["message"].is_string(), "{refused}");
    gateway.stop().await;
}

#[tokio::test]
async fn introspection_and_graphiql_can_each_be_switched_off() {
    let world = World::start().await;
    let mut settings = world.settings();
    settings.graphql.introspection = false;
    settings.graphql.graphiql = false;
    let gateway = world.gateway_with(settings).await;
    let (_, body) = gateway
        .post("{ __schema { types { name } } }", json!({}), &[])
        .await;
    assert!(body["errors"][0]["message"].is_string(), "{body}");
    assert!(
        body["data"].is_null() || body["data"]["__schema"].is_null(),
        "{body}"
    );
    assert_eq!(
        gateway.query("{ customerList { id } }").await,
        json!({"customerList": []}),
        "data queries still work"
    );
    let page = gateway
        .http
        .get(gateway.url.replace("/graphql", "/graphiql"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(page.status().as_u16(), 404);
    gateway.stop().await;

    let open = world.gateway().await;
    let data = open.query("{ __type(name: \"Order\") { name } }").await;
    assert_eq!(data, json!({"__type": {"name": "Order"}}), "on by default");
    open.stop().await;
}

#[tokio::test]
async fn an_automatic_persisted_query_is_registered_once_then_sent_by_hash() {
    let world = World::start().await;
    sqlx::raw_sql("INSERT INTO customers (id, name) VALUES (1, 'Ada');")
        .execute(&world.db)
        .await
        .expect("seed");
    let gateway = world.gateway().await;
    let query = "{ customerList { id name } }";
    let hash = format!(
        "{:x}",
        <sha2::Sha256 as sha2::Digest>::digest(query.as_bytes())
    );
    let send = |body: Value| {
        let gateway = &gateway;
        async move {
            gateway
                .http
                .post(&gateway.url)
                .header("x-api-key", common::API_KEY)
                .json(&body)
                .send()
                .await
                .expect("an answer")
                .json::<Value>()
                .await
                .expect("json")
        }
    };
    let extension = json!({"persistedQuery": {"version": 1, "sha256Hash": hash}});
    let unknown = send(json!({"extensions": extension})).await;
    assert_eq!(
        unknown["errors"][0]["message"], "PersistedQueryNotFound",
        "{unknown}"
    );
    let registered = send(json!({"query": query, "extensions": extension})).await;
    assert_eq!(
        registered["data"],
        json!({"customerList": [{"id": 1, "name": "Ada"}]})
    );
    // By hash only: from the compiled plan, the engine skipped entirely.
    for _ in 0..2 {
        let hits = gateway.plan_hits();
        let by_hash = send(json!({"extensions": extension})).await;
        assert_eq!(by_hash["data"], registered["data"], "{by_hash}");
        assert_eq!(gateway.plan_hits(), hits + 1, "answered from the plan");
    }
    let forged = send(json!({"query": "{ orderList { id } }", "extensions": extension})).await;
    assert!(
        forged["errors"][0]["message"].is_string(),
        "a hash must match its query"
    );
    let hits = gateway.plan_hits();
    let by_hash = send(json!({"extensions": extension})).await;
    assert_eq!(by_hash["data"], registered["data"], "{by_hash}");
    assert_eq!(
        gateway.plan_hits(),
        hits + 1,
        "a forged registration changes nothing"
    );
    gateway.stop().await;

    // With APQ off, a plan is no way to send a hash alone.
    let mut settings = world.settings();
    settings.graphql.persisted_queries = 0;
    let off = world.gateway_with(settings).await;
    for _ in 0..2 {
        let (_, body) = off.post(query, json!({}), common::KEYED).await;
        assert_eq!(body["data"], registered["data"], "{body}");
    }
    assert_eq!(off.plan_hits(), 1, "the text is planned");
    let hits = off.plan_hits();
    let (_, body) = off
        .post_body(json!({"query": query, "extensions": extension}))
        .await;
    assert_eq!(body["data"], registered["data"], "the text is run: {body}");
    let (_, body) = off.post_body(json!({"extensions": extension})).await;
    assert!(body["errors"][0]["message"].is_string(), "{body}");
    assert_eq!(off.plan_hits(), hits, "no plan answers a persisted query");
    off.stop().await;
}
