//! GraphQL over the declared tables: queries, filters, nested relations, mutations that become
//! events naming their actor, auth refusals, limits and an SQL-injection corpus.

mod common;

use common::{API_KEY, API_KEY_ACTOR, World, token};
use herald_shared::Op;
use serde_json::json;

async fn seed(world: &World) {
    sqlx::raw_sql(
        "INSERT INTO customers (id, name, email) VALUES
            (1, 'Ada', 'ada@example.com'), (2, 'Bob', NULL), (3, 'Cy', 'cy@example.com');
         INSERT INTO orders (id, customer_id, status, total, meta) VALUES
            (10, 1, 'paid', 12.50, '{\"gift\": true}'),
            (11, 1, 'new', 99.00, NULL),
            (12, 2, 'shipped', 5.25, NULL),
            (13, 3, 'paid', 40.00, NULL);",
    )
    .execute(&world.db)
    .await
    .expect("seed");
}

#[tokio::test]
async fn queries_filter_order_page_and_nest_relations() {
    let world = World::start().await;
    seed(&world).await;
    let gateway = world.gateway().await;

    let data = gateway
        .query("{ customer(id: 1) { name email orders(order_by: [{total: DESC}]) { id total meta } } }")
        .await;
    assert_eq!(
        data,
        json!({"customer": {"name": "Ada", "email": "ada@example.com", "orders": [
            {"id": 11, "total": "99.00", "meta": null},
            {"id": 10, "total": "12.50", "meta": {"gift": true}},
        ]}})
    );

    let data = gateway
        .query(
            r#"{ orderList(where: {or: [{status: {eq: "paid"}}, {total: {lt: 6}}]},
                           order_by: [{id: DESC}], limit: 2, offset: 1) {
                   id status customer { name } } }"#,
        )
        .await;
    assert_eq!(
        data,
        json!({"orderList": [
            {"id": 12, "status": "shipped", "customer": {"name": "Bob"}},
            {"id": 10, "status": "paid", "customer": {"name": "Ada"}},
        ]})
    );

    for (filter, expected) in [
        (r#"{id: {neq: 1}}"#, json!([2, 3])),
        (r#"{id: {gt: 1, lte: 3}}"#, json!([2, 3])),
        (r#"{id: {gte: 2, lt: 3}}"#, json!([2])),
        (r#"{id: {in: [1, 3, 7]}}"#, json!([1, 3])),
        (r#"{name: {like: "%y"}}"#, json!([3])),
        (r#"{email: {is_null: true}}"#, json!([2])),
        (
            r#"{email: {is_null: false}, and: [{name: {neq: "Cy"}}]}"#,
            json!([1]),
        ),
    ] {
        let data = gateway
            .query(&format!("{{ customerList(where: {filter}) {{ id }} }}"))
            .await;
        let ids: Vec<_> = data["customerList"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|c| c["id"].clone())
            .collect();
        assert_eq!(json!(ids), expected, "filter {filter}");
    }

    let data = gateway
        .query("{ a: customer(id: 2) { who: name } b: customer(id: 99) { name } }")
        .await;
    assert_eq!(data, json!({"a": {"who": "Bob"}, "b": null}));

    let (status, body) = gateway
        .post(
            "query($ids: [Int!]) { customerList(where: {id: {in: $ids}}) { id } }",
            json!({"ids": [2]}),
            common::KEYED,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["data"], json!({"customerList": [{"id": 2}]}));

    let over_get: serde_json::Value = gateway
        .http
        .get(format!(
            "{}?query=%7B%20customer(id%3A%203)%20%7B%20name%20%7D%20%7D",
            gateway.url
        ))
        .header("x-api-key", API_KEY)
        .send()
        .await
        .expect("GET /graphql")
        .json()
        .await
        .expect("json");
    assert_eq!(over_get["data"], json!({"customer": {"name": "Cy"}}));
    let page = gateway
        .http
        .get(gateway.url.replace("/graphql", "/graphiql"))
        .send()
        .await
        .expect("GET /graphiql")
        .text()
        .await
        .expect("html");
    assert!(page.contains("graphiql"), "a GraphiQL page");
    gateway.stop().await;
}

#[tokio::test]
async fn a_mutation_commits_the_row_and_an_event_naming_its_actor() {
    let world = World::start().await;
    let gateway = world.gateway().await;
    seed(&world).await;
    let before = world.wait_for_events(7).await.len();
    let bearer = format!("Bearer {}", token("user-42"));

    let (status, body) = gateway
        .post(
            r#"mutation { createOrder(input: {id: 20, customer_id: 2, status: "new", total: 7.5}) {
                   id status customer { name } } }"#,
            json!({}),
            &[
                ("authorization", &bearer),
                (
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
            ],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["data"],
        json!({"createOrder": {"id": 20, "status": "new", "customer": {"name": "Bob"}}}),
        "{body}"
    );
    let (_, body) = gateway
        .post(
            r#"mutation { updateOrder(id: 20, input: {status: "paid"}) { status } }"#,
            json!({}),
            &[("x-api-key", API_KEY)],
        )
        .await;
    assert_eq!(
        body["data"],
        json!({"updateOrder": {"status": "paid"}}),
        "{body}"
    );
    let (_, body) = gateway
        .post(
            "mutation { deleteOrder(id: 20) { id } }",
            json!({}),
            &[("authorization", &bearer)],
        )
        .await;
    assert_eq!(body["data"], json!({"deleteOrder": {"id": 20}}), "{body}");

    let stored = world.wait_for_events(before + 3).await;
    let mine: Vec<_> = stored[before..].iter().collect();
    let events: Vec<_> = mine.iter().map(|s| s.event()).collect();
    assert_eq!(
        events.iter().map(|e| e.op).collect::<Vec<_>>(),
        [Op::Insert, Op::Update, Op::Delete]
    );
    assert_eq!(events[0].actor.as_deref(), Some("user-42"));
    assert_eq!(events[1].actor.as_deref(), Some(API_KEY_ACTOR));
    assert_eq!(events[1].changed, Some(vec!["status".to_owned()]));
    assert_eq!(events[2].actor.as_deref(), Some("user-42"));
    assert!(events.iter().all(|e| e.key == "20" && e.entity == "Order"));
    assert_eq!(
        mine[0].header("traceparent").as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        "the caller's trace continues into the event"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn callers_without_valid_credentials_are_refused() {
    let world = World::start().await;
    seed(&world).await;
    let gateway = world.gateway().await;
    let create = r#"mutation { createCustomer(input: {name: "Eve"}) { id } }"#;

    let (status, body) = gateway.post(create, json!({}), &[]).await;
    assert_eq!(status, 200);
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("authenticated"),
        "{body}"
    );
    assert_eq!(body["errors"][0]["path"], json!(["createCustomer"]));

    let forged = {
        let claims = json!({"sub": "mallory", "exp": chrono::Utc::now().timestamp() + 600});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"some-other-secret-of-sufficient-length"),
        )
        .expect("sign")
    };
    let expired = {
        let claims = json!({"sub": "late", "exp": chrono::Utc::now().timestamp() - 3600});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(common::JWT_SECRET.as_bytes()),
        )
        .expect("sign")
    };
    for headers in [
        vec![("authorization", format!("Bearer {forged}"))],
        vec![("authorization", format!("Bearer {expired}"))],
        vec![("authorization", "Basic abc".to_owned())],
        vec![("x-api-key", "not-a-known-key-at-all".to_owned())],
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let (status, body) = gateway.post(create, json!({}), &headers).await;
        assert_eq!(status, 401, "{headers:?}: {body}");
        assert!(body["errors"][0]["message"].is_string());
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM customers")
        .fetch_one(&world.db)
        .await
        .expect("count");
    assert_eq!(count, 3, "no refused mutation wrote anything");

    let response = gateway
        .http
        .get(format!(
            "{}?query={}",
            gateway.url, "mutation%20%7B%20deleteCustomer(id%3A%201)%20%7B%20id%20%7D%20%7D"
        ))
        .header("x-api-key", API_KEY)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status().as_u16(), 405, "no mutation over GET");
    gateway.stop().await;

    let mut settings = world.settings();
    settings.auth.queries_require_auth = true;
    let strict = world.gateway_with(settings).await;
    let (status, _) = strict
        .post("{ customer(id: 1) { id } }", json!({}), &[])
        .await;
    assert_eq!(status, 401);
    let (status, body) = strict
        .post(
            "{ customer(id: 1) { id } }",
            json!({}),
            &[("x-api-key", API_KEY)],
        )
        .await;
    assert_eq!(
        (status, body["data"].clone()),
        (200, json!({"customer": {"id": 1}}))
    );
    strict.stop().await;
}

#[tokio::test]
async fn an_rs256_token_checked_against_a_jwks_file_names_the_actor() {
    let world = World::start().await;
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut settings = world.settings();
    settings.auth.jwt_rs256_jwks_file = Some(fixtures.join("rs256.jwks.json"));
    let gateway = world.gateway_with(settings).await;
    let private = std::fs::read(fixtures.join("rs256-private.der")).expect("test key");
    let sign = |kid: &str| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(kid.to_owned());
        let claims = json!({"sub": "rsa-user", "exp": chrono::Utc::now().timestamp() + 600});
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_rsa_der(&private),
        )
        .expect("sign")
    };
    let create = r#"mutation { createCustomer(input: {id: 5, name: "Rae"}) { id } }"#;
    let (status, _) = gateway
        .post(
            create,
            json!({}),
            &[("authorization", &format!("Bearer {}", sign("other-key")))],
        )
        .await;
    assert_eq!(status, 401, "a kid the JWKS does not hold is refused");
    let (status, body) = gateway
        .post(
            create,
            json!({}),
            &[("authorization", &format!("Bearer {}", sign("test-key")))],
        )
        .await;
    assert_eq!(
        (status, body["data"].clone()),
        (200, json!({"createCustomer": {"id": 5}})),
        "{body}"
    );
    let stored = world.wait_for_events(1).await;
    assert_eq!(stored[0].event().actor.as_deref(), Some("rsa-user"));
    gateway.stop().await;
}

#[tokio::test]
async fn limits_answer_with_clear_graphql_errors() {
    let world = World::start().await;
    seed(&world).await;
    let mut settings = world.settings();
    settings.limits.max_depth = 3;
    settings.limits.max_complexity = 20;
    settings.limits.max_body_bytes = 2048;
    settings.limits.max_limit = 50;
    let gateway = world.gateway_with(settings).await;

    let (_, body) = gateway
        .post(
            "{ customer(id: 1) { orders { customer { orders { id } } } } }",
            json!({}),
            common::KEYED,
        )
        .await;
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("too deep"),
        "{body}"
    );

    let aliases: String = (0..30)
        .map(|i| format!("c{i}: customer(id: 1) {{ id }} "))
        .collect();
    let (_, body) = gateway
        .post(&format!("{{ {aliases} }}"), json!({}), common::KEYED)
        .await;
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("complex"),
        "{body}"
    );

    let (_, body) = gateway
        .post(
            "{ customerList(limit: 51) { id } }",
            json!({}),
            common::KEYED,
        )
        .await;
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("maximum of 50"),
        "{body}"
    );

    let padding = " ".repeat(4096);
    let (status, body) = gateway
        .post(
            &format!("{{ customer(id: 1) {{ id }} {padding} }}"),
            json!({}),
            common::KEYED,
        )
        .await;
    assert_eq!(status, 413);
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("2048"),
        "{body}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_statement_over_the_timeout_is_cancelled_with_a_clear_error_and_writes_nothing() {
    let world = World::start().await;
    sqlx::raw_sql(
        "CREATE TABLE slow_things (id int PRIMARY KEY);
         CREATE FUNCTION dawdle() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_sleep(2); RETURN NEW; END $$;
         CREATE TRIGGER dawdle BEFORE INSERT ON slow_things FOR EACH ROW EXECUTE FUNCTION dawdle();",
    )
    .execute(&world.db)
    .await
    .expect("a slow table");
    let path = world.dir.path().join("slow.toml");
    let schema = format!(
        "{}\n[entities.SlowThing]\ntable = \"slow_things\"\nkey = \"id\"\nfields = {{ id = \"Int\" }}\n",
        common::SCHEMA
    );
    std::fs::write(&path, schema).expect("write");
    let mut settings = world.settings();
    settings.schema_file = path;
    settings.limits.statement_timeout = std::time::Duration::from_millis(200);
    let gateway = world.gateway_with(settings).await;

    let (status, body) = gateway
        .post(
            "mutation { createSlowThing(input: {id: 1}) { id } }",
            json!({}),
            &[("x-api-key", API_KEY)],
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("statement timeout"),
        "{body}"
    );
    assert_eq!(body["errors"][0]["path"], json!(["createSlowThing"]));
    let (rows, outbox): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM slow_things), (SELECT count(*) FROM herald_outbox)",
    )
    .fetch_one(&world.db)
    .await
    .expect("count");
    assert_eq!((rows, outbox), (0, 0));
    gateway.stop().await;
}

#[tokio::test]
async fn an_sql_injection_corpus_through_every_operator_matches_nothing_and_harms_nothing() {
    let world = World::start().await;
    seed(&world).await;
    let gateway = world.gateway().await;
    let corpus = [
        "' OR '1'='1",
        "'; DROP TABLE customers; --",
        "Ada' --",
        "1; DELETE FROM orders",
        "\" OR \"\"=\"",
        "') OR ('x'='x",
        "%' OR 1=1 --",
        "\\'; SELECT pg_sleep(5); --",
        "$1",
    ];
    for attack in corpus {
        for operator in ["eq", "neq", "gt", "gte", "lt", "lte", "like"] {
            let (status, body) = gateway
                .post(
                    &format!("query($v: String) {{ customerList(where: {{name: {{{operator}: $v}}}}) {{ id name }} }}"),
                    json!({"v": attack}),
                    common::KEYED,
                )
                .await;
            assert_eq!(status, 200);
            let rows = body["data"]["customerList"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            // Compared as the plain string it is, the attack can only match what that string
            // matches: no name equals or resembles it, and ordering operators see three names.
            let expected = match operator {
                "eq" | "like" => 0,
                "neq" => 3,
                _ => rows.len(),
            };
            assert_eq!(rows.len(), expected, "{operator} {attack:?}: {body}");
            assert!(rows.len() <= 3);
        }
        let (_, body) = gateway
            .post(
                "query($v: [String!]) { customerList(where: {name: {in: $v}}) { id } }",
                json!({"v": [attack, "Nobody"]}),
                common::KEYED,
            )
            .await;
        assert_eq!(
            body["data"]["customerList"],
            json!([]),
            "in {attack:?}: {body}"
        );
        let (_, body) = gateway
            .post(
                "query($v: ID!) { customer(id: $v) { id } }",
                json!({"v": attack}),
                common::KEYED,
            )
            .await;
        assert!(body["data"]["customer"].is_null(), "key {attack:?}: {body}");
        // A non-numeric value for an Int column is refused by the cast, never executed as SQL.
        let (_, body) = gateway
            .post(
                "query($v: String) { orderList(where: {status: {eq: $v}, id: {gt: 0}}) { id } }",
                json!({"v": attack}),
                common::KEYED,
            )
            .await;
        assert_eq!(body["data"]["orderList"], json!([]), "{attack:?}: {body}");
    }
    let (_, body) = gateway
        .post(
            "query($v: String) { customerList(where: {name: {eq: $v}}) { id } }",
            json!({"v": "Ada\u{0}"}),
            common::KEYED,
        )
        .await;
    assert!(
        body["errors"][0]["message"].is_string(),
        "a NUL byte is refused: {body}"
    );
    let (customers, orders): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM customers), (SELECT count(*) FROM orders)")
            .fetch_one(&world.db)
            .await
            .expect("tables are still there");
    assert_eq!((customers, orders), (3, 4));
    gateway.stop().await;
}

#[tokio::test]
async fn a_schema_file_naming_a_missing_column_refuses_to_start_naming_it() {
    let world = World::start().await;
    let broken = common::SCHEMA.replace(
        "email = \"String\"",
        "email = \"String\", phone = \"String\"",
    );
    let path = world.dir.path().join("broken.toml");
    std::fs::write(&path, broken).expect("write");
    let mut settings = world.settings();
    settings.schema_file = path;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let err = match herald_gateway::start(&settings, &world.nats, shutdown).await {
        Ok(_) => panic!("the gateway started with a column that does not exist"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("phone") && err.contains("customers"), "{err}");

    let introspected = herald_gateway::introspect(&world.db)
        .await
        .expect("introspect");
    assert_eq!(introspected.entities["Orders"].key, "id");
    assert_eq!(
        introspected.entities["Orders"].relations["customer"].entity,
        "Customers"
    );
    assert!(
        introspected.entities["Customers"]
            .relations
            .contains_key("orders")
    );
}

#[tokio::test]
async fn fragments_aliases_repeats_and_skip_include_answer_per_the_spec() {
    let world = World::start().await;
    seed(&world).await;
    let gateway = world.gateway().await;
    let corpus = [
        (
            "{ orderList(limit: 1) { customer { id } ...F } } fragment F on Order { customer { name } }",
            json!({}),
            json!({"orderList": [{"customer": {"id": 1, "name": "Ada"}}]}),
        ),
        (
            "{ c: customer(id: 1) { ... on Customer { name } n: name ... @include(if: true) { email } } }",
            json!({}),
            json!({"c": {"name": "Ada", "n": "Ada", "email": "ada@example.com"}}),
        ),
        (
            "{ customer(id: 1) { first: orders(limit: 1, order_by: [{id: ASC}]) { id }
                                  last: orders(limit: 1, order_by: [{id: DESC}]) { id } } }",
            json!({}),
            json!({"customer": {"first": [{"id": 10}], "last": [{"id": 11}]}}),
        ),
        (
            "query($s: Boolean!) { customer(id: 1) { name orders @skip(if: $s) { id } } }",
            json!({"s": true}),
            json!({"customer": {"name": "Ada"}}),
        ),
        (
            "query($s: Boolean!) { customer(id: 2) { name orders @include(if: $s) { id } } }",
            json!({"s": true}),
            json!({"customer": {"name": "Bob", "orders": [{"id": 12}]}}),
        ),
        (
            "{ orderList(where: {id: {eq: 12}}) { ...O } }
             fragment O on Order { id customer { ...C } }
             fragment C on Customer { name orders { id } }",
            json!({}),
            json!({"orderList": [{"id": 12, "customer": {"name": "Bob", "orders": [{"id": 12}]}}]}),
        ),
        (
            "{ customer(id: 2) { __typename name } }",
            json!({}),
            json!({"customer": {"__typename": "Customer", "name": "Bob"}}),
        ),
        (
            "{ customer(id: 3) { name } customer(id: 3) { email } }",
            json!({}),
            json!({"customer": {"name": "Cy", "email": "cy@example.com"}}),
        ),
        (
            "{ customer(id: 1) @include(if: false) { id } orderList(limit: 1) { id } }",
            json!({}),
            json!({"orderList": [{"id": 10}]}),
        ),
        (
            "{ orderList(limit: 1) { customer { id ...N } customer { ...N email } } }
             fragment N on Customer { name }",
            json!({}),
            json!({"orderList": [{"customer": {"id": 1, "name": "Ada", "email": "ada@example.com"}}]}),
        ),
        // A skipped subtree is never compiled: its invalid `limit` would otherwise be refused.
        (
            "{ customer(id: 1) { name orders(limit: -1) @skip(if: true) { id } } }",
            json!({}),
            json!({"customer": {"name": "Ada"}}),
        ),
        // ...nor counted: a thousand by a thousand rows costs nothing when skipped.
        (
            "{ customerList(limit: 1000) @skip(if: true) { orders(limit: 1000) { id } } customer(id: 3) { id } }",
            json!({}),
            json!({"customer": {"id": 3}}),
        ),
    ];
    // Each query twice: by the engine, then from its compiled plan; both answers must be the
    // expected one, in the selection's key order.
    let corpus_size = corpus.len() as u64;
    for (query, variables, expected) in corpus {
        let mut orders = Vec::new();
        for round in ["engine", "plan"] {
            let hits = gateway.plan_hits();
            let text = gateway
                .http
                .post(&gateway.url)
                .header("x-api-key", API_KEY)
                .json(&json!({"query": query, "variables": variables}))
                .send()
                .await
                .expect("answer")
                .text()
                .await
                .expect("text");
            let body: serde_json::Value = serde_json::from_str(&text).expect("JSON");
            assert!(body.get("errors").is_none(), "{round}: {query}: {body}");
            assert_eq!(body["data"], expected, "{round}: {query}");
            assert_eq!(
                gateway.plan_hits() - hits,
                u64::from(round == "plan"),
                "{round}: {query}"
            );
            orders.push(keys(&text));
        }
        assert_eq!(orders[0], orders[1], "the same key order: {query}");
    }
    assert_eq!(gateway.plan_hits(), corpus_size);
    gateway.stop().await;
}

/// Every object key of a JSON text, in the order the text has them (a parsed value would
/// sort them).
fn keys(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut string = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => string.extend(chars.next()),
                '"' => break,
                c => string.push(c),
            }
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() == Some(&':') {
            out.push(string);
        }
    }
    out
}

/// The shop schema plus a table with the awkward types: a 64-bit key, bounded strings, money.
async fn awkward_gateway(world: &World) -> common::Gateway {
    sqlx::raw_sql(
        "CREATE TABLE accounts (
             id bigint PRIMARY KEY,
             code varchar(5) NOT NULL,
             grade char(3),
             balance numeric(20,4),
             password_hash text NOT NULL DEFAULT 'secret'
         );",
    )
    .execute(&world.db)
    .await
    .expect("the accounts table");
    let path = world.dir.path().join("awkward.toml");
    let schema = format!(
        "{}\n[entities.Account]\ntable = \"accounts\"\nkey = \"id\"\n\
         fields = {{ id = \"Int\", code = \"String\", grade = \"String\", balance = \"Float\" }}\n",
        common::SCHEMA
    );
    std::fs::write(&path, schema).expect("write");
    let mut settings = world.settings();
    settings.schema_file = path;
    world.gateway_with(settings).await
}

fn message(body: &serde_json::Value) -> String {
    body["errors"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn values_round_trip_exactly_overflow_is_an_error_and_database_text_stays_inside() {
    let world = World::start().await;
    let gateway = awkward_gateway(&world).await;
    let key = "9007199254740993"; // 2^53 + 1: a JSON number would come back as ...992
    let money = "12345678901234.5678";
    let (_, body) = gateway
        .post(
            "mutation($id: BigInt!, $m: Decimal) { createAccount(input: {id: $id, code: \"abc\", balance: $m}) { id balance } }",
            json!({"id": key, "m": money}),
            &[("x-api-key", API_KEY)],
        )
        .await;
    assert_eq!(
        body["data"],
        json!({"createAccount": {"id": key, "balance": money}}),
        "{body}"
    );
    let data = gateway
        .query(&format!(
            "{{ account(id: \"{key}\") {{ id balance }} accountList(where: {{balance: {{gt: \"12345678901234.5677\"}}}}) {{ id }} }}"
        ))
        .await;
    assert_eq!(
        data,
        json!({"account": {"id": key, "balance": money}, "accountList": [{"id": key}]})
    );

    for (input, refusal) in [
        ("{id: 1, code: \"toolong\"}", "too long"),
        ("{id: 2, code: \"ok\", grade: \"ABCD\"}", "too long"),
        (
            "{id: 3, code: \"ok\", balance: \"123456789012345678\"}",
            "out of range",
        ),
    ] {
        let (status, body) = gateway
            .post(
                &format!("mutation {{ createAccount(input: {input}) {{ id }} }}"),
                json!({}),
                &[("x-api-key", API_KEY)],
            )
            .await;
        assert_eq!(status, 200);
        let text = message(&body);
        assert!(text.contains(refusal), "{input}: {body}");
        assert!(
            !text.contains("character varying") && !text.contains("accounts"),
            "no database text reaches the client: {text}"
        );
        let id = body["errors"][0]["extensions"]["request_id"]
            .as_str()
            .unwrap_or_default();
        assert!(!id.is_empty() && text.contains(id), "{body}");
    }
    let (_, body) = gateway
        .post(
            &format!(
                "mutation {{ createAccount(input: {{id: \"{key}\", code: \"dup\"}}) {{ id }} }}"
            ),
            json!({}),
            &[("x-api-key", API_KEY)],
        )
        .await;
    let text = message(&body);
    assert!(
        text.contains("already exists") && !text.contains("accounts_pkey"),
        "{body}"
    );
    let (codes, count): (Vec<String>, i64) =
        sqlx::query_as("SELECT array_agg(code ORDER BY id), count(*) FROM accounts")
            .fetch_one(&world.db)
            .await
            .expect("read back");
    assert_eq!(
        (codes, count),
        (vec!["abc".to_owned()], 1),
        "nothing was cut and stored"
    );

    let (_, body) = gateway
        .post(
            "{ account(id: \"1\") { password_hash } }",
            json!({}),
            common::KEYED,
        )
        .await;
    assert!(
        message(&body).contains("password_hash"),
        "unexposed: {body}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn null_in_a_filter_operator_is_an_error_not_every_row() {
    let world = World::start().await;
    seed(&world).await;
    let gateway = world.gateway().await;
    for (query, variables) in [
        (
            "{ customerList(where: {name: {eq: null}}) { id } }",
            json!({}),
        ),
        (
            "{ customerList(where: {id: {gt: null}}) { id } }",
            json!({}),
        ),
        (
            "query($v: String) { customerList(where: {name: {neq: $v}}) { id } }",
            json!({}),
        ),
        (
            "{ customerList(where: {email: {is_null: null}}) { id } }",
            json!({}),
        ),
        ("{ customerList(where: {or: null}) { id } }", json!({})),
    ] {
        let (_, body) = gateway.post(query, variables, common::KEYED).await;
        assert!(message(&body).contains("null"), "{query}: {body}");
        assert!(
            body["data"]["customerList"].is_null(),
            "no rows for {query}: {body}"
        );
    }
    assert_eq!(
        gateway
            .query("{ customerList(where: {email: {is_null: true}}) { id } }")
            .await,
        json!({"customerList": [{"id": 2}]})
    );
    gateway.stop().await;
}

#[tokio::test]
async fn list_limits_multiply_into_a_row_budget_and_aliases_are_limited() {
    let world = World::start().await;
    seed(&world).await;
    let mut settings = world.settings();
    settings.limits.max_aliases = 3;
    let gateway = world.gateway_with(settings).await;
    let (_, body) = gateway
        .post(
            "{ customerList(limit: 1000) { orders(limit: 1000) { customer { orders(limit: 1000) { id } } } } }",
            json!({}),
            common::KEYED,
        )
        .await;
    assert!(message(&body).contains("max_rows"), "{body}");
    let (_, body) = gateway
        .post(
            "query($n: Int) { customerList(limit: $n) { orders(limit: $n) { id } } }",
            json!({"n": 1000}),
            common::KEYED,
        )
        .await;
    assert!(
        message(&body).contains("max_rows"),
        "through variables: {body}"
    );
    assert_eq!(
        gateway
            .query("{ customerList(limit: 1) { orders(limit: 1) { id } } }")
            .await,
        json!({"customerList": [{"orders": [{"id": 10}]}]})
    );
    let (_, body) = gateway
        .post(
            "{ a: customer(id: 1) { b: id c: name d: email } }",
            json!({}),
            common::KEYED,
        )
        .await;
    assert!(message(&body).contains("max_aliases"), "{body}");
    let (_, body) = gateway
        .post(
            "{ customer(id: 1) { id @skip(if: false) @skip(if: false) @skip(if: false) @skip(if: false) @skip(if: false) @skip(if: false) @skip(if: false) @skip(if: false) @skip(if: false) } }",
            json!({}),
            common::KEYED,
        )
        .await;
    assert!(
        message(&body).to_lowercase().contains("directive"),
        "{body}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_key_that_names_no_single_row_or_colliding_names_refuse_the_start() {
    let world = World::start().await;
    let start = |schema: String| {
        let path = world.dir.path().join("check.toml");
        std::fs::write(&path, schema).expect("write");
        let mut settings = world.settings();
        settings.schema_file = path;
        let nats = world.nats.clone();
        async move {
            match herald_gateway::start(&settings, &nats, Default::default()).await {
                Ok(_) => panic!("the gateway started"),
                Err(e) => e.to_string(),
            }
        }
    };
    let err = start(common::SCHEMA.replace(
        "[entities.Counter]\ntable = \"counters\"\nkey = \"id\"",
        "[entities.Counter]\ntable = \"counters\"\nkey = \"n\"",
    ))
    .await;
    assert!(
        err.contains("Counter") && err.contains("`n`") && err.contains("unique"),
        "{err}"
    );

    let err = start(format!(
        "{}\n[entities.OrderList]\ntable = \"counters\"\nkey = \"id\"\nfields = {{ id = \"Int\" }}\n",
        common::SCHEMA
    ))
    .await;
    assert!(
        err.contains("Order") && err.contains("OrderList") && err.contains("orderList"),
        "{err}"
    );
}

#[tokio::test]
async fn permissions_grant_operations_per_role_and_filter_rows_on_a_claim() {
    let world = World::start().await;
    seed(&world).await;
    let path = world.dir.path().join("permissions.toml");
    let schema = format!(
        "{}\n[entities.Order.permissions.customer]\noperations = [\"read\", \"insert\", \"update\"]\n\
         row_filter = {{ column = \"customer_id\", claim = \"/app/customer\" }}\n\
         [entities.Order.permissions.admin]\noperations = [\"read\", \"insert\", \"update\", \"delete\"]\n",
        common::SCHEMA
    );
    std::fs::write(&path, schema).expect("write");
    let mut settings = world.settings();
    settings.schema_file = path;
    settings.auth.jwt_roles_claim = Some("/app/roles".into());
    settings
        .auth
        .api_key_roles
        .insert(API_KEY_ACTOR.into(), vec!["admin".into()]);
    let gateway = world.gateway_with(settings).await;
    let ada = {
        let claims = json!({"sub": "ada", "exp": chrono::Utc::now().timestamp() + 600,
                            "app": {"roles": ["customer"], "customer": 1}});
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(common::JWT_SECRET.as_bytes()),
        )
        .expect("sign");
        format!("Bearer {token}")
    };
    let as_ada = [("authorization", ada.as_str())];
    let ask = |query: &'static str, headers: &'static [(&'static str, &'static str)]| {
        let gateway = &gateway;
        async move { gateway.post(query, json!({}), headers).await.1 }
    };

    let body = ask("{ orderList { id } }", &[]).await;
    assert!(
        message(&body).contains("not permitted to read Order"),
        "{body}"
    );
    let body = gateway
        .post(
            "{ orderList { id } }",
            json!({}),
            &[("authorization", &format!("Bearer {}", token("no-roles")))],
        )
        .await
        .1;
    assert!(
        message(&body).contains("not permitted"),
        "a caller without the role: {body}"
    );

    let (_, body) = gateway
        .post(
            "{ orderList { id } order(id: 12) { id } customer(id: 2) { name orders { id } } }",
            json!({}),
            &as_ada,
        )
        .await;
    assert_eq!(
        body["data"],
        json!({"orderList": [{"id": 10}, {"id": 11}], "order": null,
               "customer": {"name": "Bob", "orders": []}}),
        "only Ada's own orders, also through a relation: {body}"
    );

    let (_, body) = gateway
        .post(
            r#"mutation { createOrder(input: {id: 30, status: "new"}) { id customer_id } }"#,
            json!({}),
            &as_ada,
        )
        .await;
    assert_eq!(
        body["data"],
        json!({"createOrder": {"id": 30, "customer_id": 1}}),
        "the filtered column is set from the claim: {body}"
    );
    for mutation in [
        r#"mutation { createOrder(input: {id: 31, customer_id: 2}) { id } }"#,
        r#"mutation { updateOrder(id: 10, input: {customer_id: 2}) { id } }"#,
        "mutation { deleteOrder(id: 10) { id } }",
    ] {
        let (_, body) = gateway.post(mutation, json!({}), &as_ada).await;
        assert!(
            message(&body).contains("not permitted"),
            "{mutation}: {body}"
        );
    }
    let (_, body) = gateway
        .post(
            r#"mutation { updateOrder(id: 12, input: {status: "mine now"}) { id } }"#,
            json!({}),
            &as_ada,
        )
        .await;
    assert_eq!(
        body["data"],
        json!({"updateOrder": null}),
        "Bob's row is out of reach: {body}"
    );

    let (_, body) = gateway
        .post(
            "mutation { deleteOrder(id: 12) { id } }",
            json!({}),
            &[("x-api-key", API_KEY)],
        )
        .await;
    assert_eq!(
        body["data"],
        json!({"deleteOrder": {"id": 12}}),
        "the admin role: {body}"
    );
    let rows: Vec<(i32, Option<i32>, String)> =
        sqlx::query_as("SELECT id, customer_id, status FROM orders ORDER BY id")
            .fetch_all(&world.db)
            .await
            .expect("read back");
    assert_eq!(
        rows,
        vec![
            (10, Some(1), "paid".to_owned()),
            (11, Some(1), "new".to_owned()),
            (13, Some(3), "paid".to_owned()),
            (30, Some(1), "new".to_owned()),
        ]
    );

    // A compiled plan is no way around them: the admin's answer makes the plan, then each
    // caller gets what its own roles and claims reach, the same as the engine answers them.
    let cy = {
        let claims = json!({"sub": "cy", "exp": chrono::Utc::now().timestamp() + 600,
                            "app": {"roles": ["customer"], "customer": 3}});
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(common::JWT_SECRET.as_bytes()),
        )
        .expect("sign");
        format!("Bearer {token}")
    };
    let planned = "{ orderList(order_by: [{id: ASC}]) { id } orderAggregate { count } }";
    let ids = |body: &serde_json::Value| body["data"]["orderList"].clone();
    let hits = gateway.plan_hits();
    for _ in 0..2 {
        let (_, admin) = gateway.post(planned, json!({}), common::KEYED).await;
        assert_eq!(
            ids(&admin),
            json!([{"id": 10}, {"id": 11}, {"id": 13}, {"id": 30}])
        );
        assert_eq!(admin["data"]["orderAggregate"], json!({"count": 4}));
        let (_, body) = gateway.post(planned, json!({}), &as_ada).await;
        assert_eq!(
            ids(&body),
            json!([{"id": 10}, {"id": 11}, {"id": 30}]),
            "{body}"
        );
        assert_eq!(
            body["data"]["orderAggregate"],
            json!({"count": 3}),
            "{body}"
        );
        let (_, body) = gateway
            .post(planned, json!({}), &[("authorization", cy.as_str())])
            .await;
        assert_eq!(ids(&body), json!([{"id": 13}]), "{body}");
        let (_, body) = gateway.post(planned, json!({}), &[]).await;
        assert!(
            message(&body).contains("not permitted to read Order"),
            "{body}"
        );
        let (_, body) = gateway
            .post(
                planned,
                json!({}),
                &[("authorization", &format!("Bearer {}", token("no-roles")))],
            )
            .await;
        assert!(message(&body).contains("not permitted"), "{body}");
    }
    assert_eq!(
        gateway.plan_hits() - hits,
        5,
        "the second admin, both of Ada's, both of Cy's"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn keyset_pages_aggregates_multi_row_inserts_and_upserts() {
    let world = World::start().await;
    let gateway = world.gateway().await;
    seed(&world).await;
    let before = world.wait_for_events(7).await.len();

    let page = |after: &str| {
        format!("{{ orderList(order_by: [{{status: ASC}}], limit: 2{after}) {{ id }} }}")
    };
    // status order: new(11) paid(10) paid(13) shipped(12); ties broken by the key.
    assert_eq!(
        gateway.query(&page("")).await,
        json!({"orderList": [{"id": 11}, {"id": 10}]})
    );
    assert_eq!(
        gateway.query(&page(", after: 10")).await,
        json!({"orderList": [{"id": 13}, {"id": 12}]})
    );
    assert_eq!(
        gateway
            .query("{ customer(id: 1) { orders(order_by: [{total: DESC}], after: 11) { id } } }")
            .await,
        json!({"customer": {"orders": [{"id": 10}]}})
    );
    assert_eq!(
        gateway
            .query(r#"{ all: orderAggregate { count } paid: orderAggregate(where: {status: {eq: "paid"}}) { n: count } }"#)
            .await,
        json!({"all": {"count": 4}, "paid": {"n": 2}})
    );

    let (_, body) = gateway
        .post(
            r#"mutation { createOrderList(inputs: [{id: 40, customer_id: 1, status: "new"},
                                                  {id: 41, customer_id: 2}]) { id status } }"#,
            json!({}),
            &[("x-api-key", API_KEY)],
        )
        .await;
    assert_eq!(
        body["data"],
        json!({"createOrderList": [{"id": 40, "status": "new"}, {"id": 41, "status": "new"}]}),
        "{body}"
    );
    let (_, body) = gateway
        .post(
            r#"mutation { createOrderList(inputs: [{id: 42}, {id: 40}]) { id } }"#,
            json!({}),
            &[("x-api-key", API_KEY)],
        )
        .await;
    assert!(message(&body).contains("already exists"), "{body}");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = 42")
        .fetch_one(&world.db)
        .await
        .expect("count");
    assert_eq!(
        count, 0,
        "one statement: the failing row takes the other with it"
    );

    for (status, expected) in [("first", "first"), ("second", "second")] {
        let (_, body) = gateway
            .post(
                &format!(r#"mutation {{ upsertOrder(input: {{id: 50, customer_id: 3, status: "{status}"}}) {{ id status }} }}"#),
                json!({}),
                &[("x-api-key", API_KEY)],
            )
            .await;
        assert_eq!(
            body["data"],
            json!({"upsertOrder": {"id": 50, "status": expected}}),
            "{body}"
        );
    }
    let stored = world.wait_for_events(before + 4).await;
    let events: Vec<_> = stored[before..].iter().map(|s| s.event()).collect();
    assert_eq!(
        events
            .iter()
            .map(|e| (e.op, e.key.as_str()))
            .collect::<Vec<_>>(),
        [
            (Op::Insert, "40"),
            (Op::Insert, "41"),
            (Op::Insert, "50"),
            (Op::Update, "50"),
        ],
        "one event per row"
    );
    assert_eq!(events[0].tx, events[1].tx, "the rows share one transaction");
    gateway.stop().await;
}

/// A corpus of orderings over columns full of NULLs: paging with `after` (the last key of each
/// page) in pages of 3 gives exactly the unpaged order, which is the order NULLS LAST ascending
/// and NULLS FIRST descending, ties broken by the key; nothing skipped, nothing repeated.
#[tokio::test]
async fn keyset_pages_over_nullable_order_columns_skip_and_repeat_nothing() {
    /// id, customer_id, total, note
    type Row = (i32, Option<i32>, Option<String>, Option<String>);
    let world = World::start().await;
    let gateway = world.gateway().await;
    sqlx::raw_sql(
        "INSERT INTO customers (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c');
         INSERT INTO orders (id, customer_id, status, total, note)
           SELECT g,
                  CASE WHEN g % 4 = 0 THEN NULL ELSE 1 + g % 3 END,
                  'new',
                  CASE WHEN g % 3 = 0 THEN NULL ELSE (g * 7) % 5 END,
                  CASE WHEN g % 5 < 2 THEN NULL ELSE chr(97 + (g * 3) % 4) END
           FROM generate_series(1, 40) g;",
    )
    .execute(&world.db)
    .await
    .expect("seed");
    let rows: Vec<Row> = sqlx::query_as("SELECT id, customer_id, total::text, note FROM orders")
        .fetch_all(&world.db)
        .await
        .expect("rows");
    // (column, direction) → the expected order of ids, computed here rather than by the server.
    let value = |row: &Row, column: &str| match column {
        "customer_id" => row.1.map(|v| format!("{v:08}")),
        "total" => row.2.clone().map(|v| format!("{:>12}", v)),
        "note" => row.3.clone(),
        _ => unreachable!(),
    };
    let orderings: [&[(&str, &str)]; 6] = [
        &[("total", "ASC")],
        &[("total", "DESC")],
        &[("note", "ASC"), ("total", "DESC")],
        &[("customer_id", "DESC"), ("note", "ASC")],
        &[("note", "DESC"), ("customer_id", "ASC"), ("total", "ASC")],
        &[("customer_id", "ASC")],
    ];
    for ordering in orderings {
        let mut expected = rows.clone();
        expected.sort_by(|a, b| {
            for (column, direction) in ordering {
                let (x, y) = (value(a, column), value(b, column));
                // NULL sorts last ascending, first descending.
                let order = match (&x, &y) {
                    (None, None) => std::cmp::Ordering::Equal,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (Some(x), Some(y)) => x.cmp(y),
                };
                let order = if *direction == "DESC" {
                    order.reverse()
                } else {
                    order
                };
                if order.is_ne() {
                    return order;
                }
            }
            a.0.cmp(&b.0)
        });
        let expected: Vec<i64> = expected.iter().map(|r| i64::from(r.0)).collect();
        let order_by = ordering
            .iter()
            .map(|(c, d)| format!("{{{c}: {d}}}"))
            .collect::<Vec<_>>()
            .join(", ");
        let ids = |data: &serde_json::Value, path: &[&str]| -> Vec<i64> {
            let mut list = data;
            for step in path {
                list = &list[step];
            }
            list.as_array()
                .expect("a list")
                .iter()
                .map(|o| o["id"].as_i64().expect("an id"))
                .collect()
        };
        let whole = gateway
            .query(&format!(
                "{{ orderList(order_by: [{order_by}], limit: 100) {{ id }} }}"
            ))
            .await;
        assert_eq!(ids(&whole, &["orderList"]), expected, "unpaged {order_by}");
        let mut paged = Vec::new();
        let mut after = String::new();
        loop {
            let page = gateway
                .query(&format!(
                    "{{ orderList(order_by: [{order_by}], limit: 3{after}) {{ id }} }}"
                ))
                .await;
            let page = ids(&page, &["orderList"]);
            let Some(last) = page.last() else { break };
            after = format!(", after: {last}");
            paged.extend(page);
            assert!(
                paged.len() <= expected.len(),
                "paging repeats rows: {order_by}"
            );
        }
        assert_eq!(paged, expected, "paged {order_by}");
    }
    // A nested list pages the same way, and an `after` naming no row pages nothing.
    let nested = gateway
        .query("{ customer(id: 2) { orders(order_by: [{note: DESC}, {total: ASC}], limit: 100) { id } } }")
        .await;
    let all: Vec<_> = nested["customer"]["orders"]
        .as_array()
        .expect("list")
        .clone();
    assert!(all.len() > 4, "{nested}");
    let from = all[2]["id"].as_i64().expect("id");
    let rest = gateway
        .query(&format!(
            "{{ customer(id: 2) {{ orders(order_by: [{{note: DESC}}, {{total: ASC}}], after: {from}) {{ id }} }} }}"
        ))
        .await;
    assert_eq!(
        rest["customer"]["orders"].as_array().expect("list")[..],
        all[3..]
    );
    let none = gateway
        .query("{ orderList(order_by: [{total: DESC}], after: 999) { id } }")
        .await;
    assert_eq!(none, json!({"orderList": []}));
    gateway.stop().await;
}

/// Anonymous access is off unless the schema file grants the `anonymous` role: an entity
/// without permissions answers authenticated callers only, and an anonymous grant opens
/// exactly what it lists (not a relation into an entity it does not cover, not a write).
#[tokio::test]
async fn anonymous_callers_reach_only_what_the_schema_file_grants_the_anonymous_role() {
    let world = World::start().await;
    seed(&world).await;
    let gateway = world.gateway().await;
    for query in [
        "{ customerList { id } }",
        "{ customer(id: 1) { name } }",
        "{ orderAggregate { count } }",
    ] {
        let (status, body) = gateway.post(query, json!({}), &[]).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            message(&body).contains("closed to anonymous callers"),
            "{query}: {body}"
        );
        assert!(
            body["data"]
                .as_object()
                .is_none_or(|d| d.values().all(|v| v.is_null())),
            "{query}: no data: {body}"
        );
    }
    let (_, body) = gateway
        .post("{ customer(id: 1) { name } }", json!({}), common::KEYED)
        .await;
    assert_eq!(body["data"], json!({"customer": {"name": "Ada"}}), "{body}");
    gateway.stop().await;

    let path = world.dir.path().join("anonymous.toml");
    let schema = format!(
        "{}\n[entities.Customer.permissions.anonymous]\noperations = [\"read\"]\n\
         [entities.Customer.permissions.staff]\noperations = [\"read\", \"insert\", \"update\", \"delete\"]\n",
        common::SCHEMA
    );
    std::fs::write(&path, schema).expect("write");
    let mut settings = world.settings();
    settings.schema_file = path;
    settings
        .auth
        .api_key_roles
        .insert(API_KEY_ACTOR.into(), vec!["staff".into()]);
    let open = world.gateway_with(settings).await;
    let (_, body) = open
        .post("{ customerList(limit: 2) { id name } }", json!({}), &[])
        .await;
    assert_eq!(
        body,
        json!({"data": {"customerList": [{"id": 1, "name": "Ada"}, {"id": 2, "name": "Bob"}]}}),
        "the anonymous grant opens Customer reads"
    );
    for query in [
        "{ customer(id: 1) { name orders { id } } }",
        "{ orderList { id } }",
        r#"mutation { createCustomer(input: {name: "Eve"}) { id } }"#,
        "mutation { deleteCustomer(id: 1) { id } }",
    ] {
        let (_, body) = open.post(query, json!({}), &[]).await;
        let text = message(&body);
        assert!(
            text.contains("closed to anonymous callers")
                || text.contains("authenticated")
                || text.contains("not permitted"),
            "{query}: {body}"
        );
    }
    let (_, body) = open
        .post(
            r#"mutation { createCustomer(input: {id: 50, name: "Eve"}) { name } }"#,
            json!({}),
            common::KEYED,
        )
        .await;
    assert_eq!(
        body["data"],
        json!({"createCustomer": {"name": "Eve"}}),
        "{body}"
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM customers")
        .fetch_one(&world.db)
        .await
        .expect("count");
    assert_eq!(count, 4, "only the keyed write happened");
    open.stop().await;
}
