//! GraphQL over HTTP: `POST /graphql` (JSON body) and `GET /graphql` (query string), answers in
//! the GraphQL JSON shape with error paths; `GET /graphiql` serves the GraphiQL page.
//!
//! Authentication happens here, before execution, so a wrong credential is refused with 401 and
//! the resolvers only ever see a known caller.

use std::sync::Arc;

use async_graphql::dynamic::Schema;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use herald_shared::headers::TRACEPARENT;
use herald_shared::telemetry;
use tracing::Instrument;

use crate::auth::{Authenticator, Caller};
use crate::collect;
use crate::graphql::RequestContext;
use crate::order;
use crate::plan::Plans;

pub struct Http {
    pub schema: Schema,
    /// Compiled plans (`plan.rs`), unless `graphql.compiled_plans` is 0.
    pub plans: Option<Arc<Plans>>,
    pub auth: Authenticator,
    pub max_body_bytes: usize,
    /// Serve the GraphiQL page (`graphql.graphiql`).
    pub graphiql: bool,
}

pub fn router(http: Http) -> Router {
    let limit = http.max_body_bytes;
    let mut router = Router::new().route("/graphql", get(get_graphql).post(post_graphql));
    if http.graphiql {
        router = router.route("/graphiql", get(graphiql));
    }
    router
        .layer(DefaultBodyLimit::max(limit))
        .with_state(Arc::new(http))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "errors": [{ "message": message.into() }] });
    (status, axum::Json(body)).into_response()
}

async fn post_graphql(
    State(http): State<Arc<Http>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "request body is larger than the limit of {} bytes (limits.max_body_bytes)",
                    http.max_body_bytes
                ),
            );
        }
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    match serde_json::from_slice::<async_graphql::Request>(&body) {
        Ok(request) => execute(&http, &headers, request).await,
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            format!("the body is not a GraphQL request: {e}"),
        ),
    }
}

async fn get_graphql(
    State(http): State<Arc<Http>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    match async_graphql::http::parse_query_string(query.as_deref().unwrap_or_default()) {
        Ok(request) if is_mutation(&request.query) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "mutations are only accepted with POST",
        ),
        Ok(request) => execute(&http, &headers, request).await,
        Err(e) => error(StatusCode::BAD_REQUEST, format!("bad query string: {e}")),
    }
}

/// GraphQL over HTTP forbids mutations over GET (a link or a prefetch must not write).
fn is_mutation(query: &str) -> bool {
    async_graphql::parser::parse_query(query).is_ok_and(|document| {
        document.operations.iter().any(|(_, operation)| {
            operation.node.ty == async_graphql::parser::types::OperationType::Mutation
        })
    })
}

async fn execute(http: &Http, headers: &HeaderMap, request: async_graphql::Request) -> Response {
    let caller = match http.auth.authenticate(headers) {
        Ok(caller) => caller,
        Err(e) => return error(StatusCode::UNAUTHORIZED, e.to_string()),
    };
    if caller == Caller::Anonymous && http.auth.queries_require_auth() {
        return error(
            StatusCode::UNAUTHORIZED,
            "this gateway requires a JWT or an API key for every request",
        );
    }
    // The request is a span in the caller's trace (when it sent one); the outbox row records
    // this span's context, so the event's trace goes on from the request that wrote it.
    let span = tracing::info_span!("graphql");
    let caller_trace = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok());
    if let Some(parent) = caller_trace {
        let mut incoming = async_nats::HeaderMap::new();
        incoming.insert(TRACEPARENT, parent);
        telemetry::adopt_context(&span, Some(&incoming));
    }
    let mut carried = async_nats::HeaderMap::new();
    span.in_scope(|| telemetry::inject_context(&mut carried));
    // With no span recorded (no subscriber, or a filter above `info`), the caller's own.
    let traceparent =
        telemetry::traceparent(Some(&carried)).or_else(|| caller_trace.map(str::to_owned));
    let probe = http.plans.as_ref().and_then(|plans| plans.probe(&request));
    if let (Some(plans), Some(probe)) = (&http.plans, &probe)
        && let Some(body) = plans.answer(probe, &caller).instrument(span.clone()).await
    {
        return (
            [(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
    }
    // The document is parsed once, here: the engine takes it as it is (its parse step, and the
    // budget check on it, still run), and its collected selections re-order the engine's answer
    // (which comes in completion order) and make the plan. A document that does not parse is
    // left to the engine, which answers why.
    let mut request = request;
    let collected = if request.query.is_empty() {
        None
    } else {
        async_graphql::parser::parse_query(&request.query)
            .ok()
            .map(|document| {
                let collected = collect::document_selections(
                    &document,
                    request.operation_name.as_deref(),
                    &request.variables,
                );
                request.set_parsed_query(document);
                collected
            })
    };
    let collected = collected.flatten();
    let mut response = http
        .schema
        .execute(request.data(RequestContext {
            caller,
            traceparent,
            request_id: uuid::Uuid::now_v7().to_string(),
        }))
        .instrument(span)
        .await;
    if let Some((_, selections)) = &collected {
        order::in_selection_order(&mut response.data, selections);
    }
    if let (Some(plans), Some(probe)) = (&http.plans, probe)
        && response.is_ok()
    {
        plans.learn(probe, collected);
    }
    axum::Json(response).into_response()
}

async fn graphiql() -> impl IntoResponse {
    Html(
        async_graphql::http::GraphiQLSource::build()
            .endpoint("/graphql")
            .finish(),
    )
}
