//! Compiled plans: the fast path for a query the gateway has already answered.
//!
//! The first time a query document (by its sha256, which is also its persisted-query hash),
//! operation and variables is asked, it runs through async-graphql as every request does:
//! parsed, validated, checked against the limits (`budget.rs`), executed. When that answer has
//! no error, the operation's root fields are collected (`collect.rs`) and kept as a plan. The
//! next identical request skips the engine: its statements (compiled per caller access and
//! cached per role set, unless a row filter reads the caller's claims) run as they are and the
//! `json` text PostgreSQL returns is the response's `data` entries, written without decoding.
//!
//! What stays as strict as the engine's path:
//! - Validation and limits: a plan exists only for a document, operation and variables that
//!   passed both; the variables are part of the key, so new values take the full path once.
//! - Permissions: the statements are compiled for this caller's roles (and claims) every time
//!   they are not cached for exactly these roles; a refusal, like any compile or database error,
//!   sends the request down the engine's path, which answers it as usual.
//! - Persisted queries: a hash-only request is planned only while APQ is on, and only for a
//!   document registered with its text (whose hash async-graphql checked).
//!
//! Only queries whose root fields are all entity reads (`<entity>`, `<entity>List`,
//! `<entity>Aggregate`) are planned; mutations, introspection and `__typename` at the root
//! always take the engine's path.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_graphql::Value;
use async_graphql::parser::types::OperationType;
use lru::LruCache;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::auth::Caller;
use crate::collect;
use crate::query::{Access, Compiler, ListArgs, Param, QueryError, Selection, Statement};
use crate::schema::Catalog;
use crate::settings::Limits;

/// A query root field a plan can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadKind {
    ByKey,
    List,
    Aggregate,
}

/// Root field name → (entity, key argument, kind).
pub type ReadRoots = HashMap<String, (String, String, ReadKind)>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PlanKey {
    /// sha256 of the document text, hex (what APQ clients send).
    document: String,
    operation: Option<String>,
    /// The request's variables as JSON.
    variables: String,
}

/// Whose access a set of compiled statements was built for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AccessKey {
    anonymous: bool,
    roles: Vec<String>,
}

struct Root {
    key: String,
    entity: String,
    key_arg: String,
    kind: ReadKind,
    selection: Selection,
}

/// One statement ready to run: the SQL (returning the answer as text) and its parameters.
struct Ready {
    sql: Arc<str>,
    params: Vec<Param>,
}

struct Plan {
    roots: Vec<Root>,
    compiled: Mutex<HashMap<AccessKey, Arc<Vec<Ready>>>>,
}

/// What is known of a request before it runs, to find or later make its plan.
pub struct Probe {
    key: PlanKey,
    text: Option<Arc<str>>,
    variables: async_graphql::Variables,
}

pub struct Plans {
    pool: PgPool,
    catalog: Arc<Catalog>,
    limits: Limits,
    roots: ReadRoots,
    persisted_queries: bool,
    plans: Mutex<LruCache<PlanKey, Arc<Plan>>>,
    /// Document texts that answered without error, by hash: what a hash-only request is.
    documents: Mutex<LruCache<String, Arc<str>>>,
    hits: AtomicU64,
}

/// Role sets compiled per plan at most; beyond it a plan compiles per request.
const ACCESS_SETS_PER_PLAN: usize = 64;

impl Plans {
    /// `capacity` plans (0: none, every request takes the engine's path).
    pub fn new(
        pool: PgPool,
        catalog: Arc<Catalog>,
        limits: Limits,
        roots: ReadRoots,
        capacity: usize,
        persisted_queries: bool,
    ) -> Option<Self> {
        let capacity = NonZeroUsize::new(capacity)?;
        Some(Self {
            pool,
            catalog,
            limits,
            roots,
            persisted_queries,
            plans: Mutex::new(LruCache::new(capacity)),
            documents: Mutex::new(LruCache::new(capacity)),
            hits: AtomicU64::new(0),
        })
    }

    /// Requests answered from a plan so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// The request's plan key, when it can have one.
    pub fn probe(&self, request: &async_graphql::Request) -> Option<Probe> {
        let persisted = match request.extensions.get("persistedQuery") {
            None => None,
            Some(value) => {
                let json = value.clone().into_json().ok()?;
                if json.get("version").and_then(|v| v.as_i64()) != Some(1)
                    || !self.persisted_queries
                {
                    return None;
                }
                Some(json.get("sha256Hash")?.as_str()?.to_owned())
            }
        };
        let (document, text) = if request.query.is_empty() {
            (persisted?, None)
        } else {
            let hash = format!("{:x}", Sha256::digest(request.query.as_bytes()));
            // A mismatching hash is the engine's to refuse.
            if persisted.is_some_and(|given| given != hash) {
                return None;
            }
            (hash, Some(Arc::from(request.query.as_str())))
        };
        Some(Probe {
            key: PlanKey {
                document,
                operation: request.operation_name.clone(),
                variables: serde_json::to_string(&request.variables).ok()?,
            },
            text,
            variables: request.variables.clone(),
        })
    }

    /// Answers from the plan, if there is one and it runs cleanly for this caller: the whole
    /// response body. `None` sends the request down the engine's path.
    pub async fn answer(&self, probe: &Probe, caller: &Caller) -> Option<String> {
        let plan = self.plans.lock().ok()?.get(&probe.key).cloned()?;
        let statements = self.statements(&plan, caller)?;
        let texts = futures::future::try_join_all(statements.iter().map(|ready| {
            let mut query =
                sqlx::query_scalar::<_, Option<String>>(sqlx::AssertSqlSafe(ready.sql.clone()));
            for param in &ready.params {
                query = match param {
                    Param::Text(text) => query.bind(text.clone()),
                    Param::TextArray(items) => query.bind(items.clone()),
                    Param::Int(n) => query.bind(*n),
                };
            }
            query.fetch_optional(&self.pool)
        }))
        .await
        .ok()?;
        let mut body = String::from("{\"data\":{");
        for (i, (root, text)) in plan.roots.iter().zip(texts).enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&serde_json::to_string(&root.key).ok()?);
            body.push(':');
            body.push_str(text.flatten().as_deref().unwrap_or("null"));
        }
        body.push_str("}}");
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(body)
    }

    /// The plan's statements for this caller: cached per role set, or compiled now when a row
    /// filter reads the caller's claims. `None` when the caller may not run them.
    fn statements(&self, plan: &Plan, caller: &Caller) -> Option<Arc<Vec<Ready>>> {
        let access = AccessKey {
            anonymous: *caller == Caller::Anonymous,
            roles: caller.roles().into_iter().map(str::to_owned).collect(),
        };
        if let Some(ready) = plan.compiled.lock().ok()?.get(&access) {
            return Some(ready.clone());
        }
        let claims_read = std::cell::Cell::new(false);
        let claim = |name: &str| {
            claims_read.set(true);
            caller.claim(name)
        };
        let mut ready = Vec::with_capacity(plan.roots.len());
        for root in &plan.roots {
            let compiler = Compiler::new(&self.catalog, &self.limits)
                .as_response_text()
                .with_access(Access {
                    anonymous: access.anonymous,
                    roles: caller.roles(),
                    claim: &claim,
                });
            let statement = compile(compiler, root).ok()?;
            ready.push(Ready {
                sql: Arc::from(format!("SELECT r.j::text FROM ({}) AS r(j)", statement.sql)),
                params: statement.params,
            });
        }
        let ready = Arc::new(ready);
        if !claims_read.get() {
            let mut compiled = plan.compiled.lock().ok()?;
            if compiled.len() < ACCESS_SETS_PER_PLAN {
                compiled.insert(access, ready.clone());
            }
        }
        Some(ready)
    }

    /// After the engine answered `probe`'s request without error: keep its plan. `collected`
    /// is the request's operation type and root selections when the caller already has them
    /// (else the document is read again).
    pub fn learn(&self, probe: Probe, collected: Option<(OperationType, Vec<Selection>)>) {
        let text = match &probe.text {
            Some(text) => text.clone(),
            None => match self
                .documents
                .lock()
                .ok()
                .and_then(|mut d| d.get(&probe.key.document).cloned())
            {
                Some(text) => text,
                None => return,
            },
        };
        if self.persisted_queries
            && let Ok(mut documents) = self.documents.lock()
        {
            documents.put(probe.key.document.clone(), text.clone());
        }
        let collected = collected.or_else(|| {
            collect::operation_selections(&text, probe.key.operation.as_deref(), &probe.variables)
        });
        let Some(roots) = collected.and_then(|(ty, selections)| self.plan_roots(ty, selections))
        else {
            return;
        };
        let plan = Arc::new(Plan {
            roots,
            compiled: Mutex::new(HashMap::new()),
        });
        if let Ok(mut plans) = self.plans.lock() {
            plans.put(probe.key, plan);
        }
    }

    fn plan_roots(&self, ty: OperationType, selections: Vec<Selection>) -> Option<Vec<Root>> {
        if ty != OperationType::Query {
            return None;
        }
        selections
            .into_iter()
            .map(|selection| {
                let (entity, key_arg, kind) = self.roots.get(&selection.field)?.clone();
                Some(Root {
                    key: selection.key.clone(),
                    entity,
                    key_arg,
                    kind,
                    selection,
                })
            })
            .collect()
    }
}

fn compile(compiler: Compiler<'_>, root: &Root) -> Result<Statement, QueryError> {
    let selection = &root.selection;
    let children = &selection.children;
    match root.kind {
        ReadKind::ByKey => {
            let key = selection
                .argument(&root.key_arg)
                .cloned()
                .unwrap_or(Value::Null);
            compiler.by_key(&root.entity, &key, children)
        }
        ReadKind::List => compiler.list(&root.entity, &ListArgs::of(selection), children),
        ReadKind::Aggregate => {
            compiler.aggregate(&root.entity, selection.argument("where"), children)
        }
    }
}
