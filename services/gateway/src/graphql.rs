//! The GraphQL schema, built at start from the checked catalogue with async-graphql's dynamic
//! schema (spec-compliant parsing, validation, introspection), and the resolvers of its root
//! fields. A root resolver collects its selection as the spec says (`collect.rs`), compiles it
//! to one statement (`query.rs`) and runs it; the per-field resolvers below it only read the
//! JSON the statement returned. What a request may cost is checked before it runs (`budget.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_graphql::dynamic::{
    Enum, Field, FieldFuture, FieldValue, InputObject, InputValue, Object, ResolverContext, Scalar,
    Schema, TypeRef,
};
use async_graphql::extensions::apollo_persisted_queries::{
    ApolloPersistedQueries, LruCacheStorage,
};
use async_graphql::{ErrorExtensions, Value};
use sqlx::PgPool;

use crate::auth::Caller;
use crate::budget::{self, Budget, Shape};
use crate::collect::{CollectError, Collector};
use crate::query::{Access, Compiler, ListArgs, Param, QueryError, Selection, Statement};
use crate::schema::{Catalog, CheckedEntity, RelationKind};
use crate::settings::{GraphqlSettings, Limits};

/// Every scalar a column can be served as; each gets a `<Scalar>Filter` input type.
const SCALARS: [&str; 8] = [
    "ID", "Int", "Float", "String", "Boolean", "JSON", "BigInt", "Decimal",
];

/// What every resolver needs, stored in the schema's data.
struct Backend {
    pool: PgPool,
    catalog: Arc<Catalog>,
    limits: Limits,
}

/// Per-request data: who calls, the trace to hand to the events it causes, and the id that
/// ties a client's error to the gateway's log line.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub caller: Caller,
    pub traceparent: Option<String>,
    pub request_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Collect(#[from] CollectError),
    #[error("mutations require an authenticated caller (a JWT or an API key)")]
    Unauthenticated,
    /// The database refused the statement. Its own text (which can name tables, constraints
    /// and values) is only logged; the client gets what kind of refusal it was.
    #[error("{}", database_refusal(.code.as_deref()))]
    Database {
        code: Option<String>,
        message: String,
    },
    #[error("the statement exceeded the statement timeout and was cancelled")]
    Timeout,
    #[error("{0}")]
    Engine(String),
}

/// What a client may learn from an SQLSTATE: the class of the problem, never the server's text.
fn database_refusal(code: Option<&str>) -> &'static str {
    match code.unwrap_or_default() {
        "22001" => "a value is too long for its column",
        "22003" => "a number is out of range for its column",
        "22P02" | "22007" | "22008" | "22023" => "a value is not valid for its column's type",
        "22021" | "22P05" => "a value holds a character its column cannot store",
        "23502" => "a required value is missing (a NOT NULL column)",
        "23503" => "a referenced row does not exist, or other rows still refer to this one",
        "23505" => "a row with this unique value already exists",
        "23514" => "a value breaks a check constraint",
        code if code.starts_with("40") => "the transaction conflicted with another; retry it",
        _ => "the database could not run the request",
    }
}

impl From<sqlx::Error> for ResolveError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            // 57014: query_canceled, which is how statement_timeout ends a statement.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("57014") => {
                ResolveError::Timeout
            }
            sqlx::Error::Database(db) => ResolveError::Database {
                code: db.code().map(|c| c.into_owned()),
                message: db.message().to_owned(),
            },
            _ => ResolveError::Database {
                code: None,
                message: e.to_string(),
            },
        }
    }
}

/// Why the schema cannot be built from the catalogue.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("generated GraphQL names collide:\n{}", .0.join("\n"))]
    Collisions(Vec<String>),
    #[error(transparent)]
    Schema(#[from] async_graphql::dynamic::SchemaError),
}

fn lower_first(name: &str) -> String {
    let mut chars = name.chars();
    chars
        .next()
        .map(|c| c.to_ascii_lowercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

/// The type and root-field names an entity generates, each with what kind of name it is.
fn generated_names(entity: &CheckedEntity) -> Vec<String> {
    let name = &entity.name;
    let single = lower_first(name);
    vec![
        format!("type {name}"),
        format!("type {name}Where"),
        format!("type {name}OrderBy"),
        format!("type {name}Input"),
        format!("field Query.{single}"),
        format!("field Query.{single}List"),
        format!("type {name}Aggregate"),
        format!("field Query.{single}Aggregate"),
        format!("field Mutation.create{name}"),
        format!("field Mutation.create{name}List"),
        format!("field Mutation.upsert{name}"),
        format!("field Mutation.update{name}"),
        format!("field Mutation.delete{name}"),
    ]
}

/// Two entities generating one name would make async-graphql refuse (or panic on) the schema;
/// this names both at start instead.
fn check_names(catalog: &Catalog) -> Result<(), BuildError> {
    let mut owners: BTreeMap<String, String> = BTreeMap::new();
    let built_in = SCALARS
        .iter()
        .flat_map(|s| [format!("type {s}"), format!("type {s}Filter")])
        .chain(["type OrderDirection", "type Query", "type Mutation"].map(String::from));
    for name in built_in {
        owners.insert(name, "the gateway's built-in types".to_owned());
    }
    let mut collisions = Vec::new();
    for entity in catalog.entities.values() {
        for name in generated_names(entity) {
            let owner = format!("entity {}", entity.name);
            match owners.get(&name) {
                Some(first) => collisions.push(format!("{owner} and {first} both generate {name}")),
                None => {
                    owners.insert(name, owner);
                }
            }
        }
    }
    if collisions.is_empty() {
        Ok(())
    } else {
        Err(BuildError::Collisions(collisions))
    }
}

fn text_scalar(name: &str, description: &str, valid: fn(&str) -> bool) -> Scalar {
    Scalar::new(name)
        .description(description)
        .validator(move |value| match value {
            Value::String(text) => valid(text),
            Value::Number(n) => valid(&n.to_string()),
            _ => false,
        })
}

fn is_decimal(text: &str) -> bool {
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    !(whole.is_empty() && fraction.is_empty())
        && whole.chars().all(|c| c.is_ascii_digit())
        && fraction.chars().all(|c| c.is_ascii_digit())
}

/// The query root fields a compiled plan can answer (`plan.rs`), named as `build` names them.
pub fn read_roots(catalog: &Catalog) -> crate::plan::ReadRoots {
    use crate::plan::ReadKind;
    let mut roots = crate::plan::ReadRoots::new();
    for entity in catalog.entities.values() {
        let single = lower_first(&entity.name);
        for (field, kind) in [
            (single.clone(), ReadKind::ByKey),
            (format!("{single}List"), ReadKind::List),
            (format!("{single}Aggregate"), ReadKind::Aggregate),
        ] {
            roots.insert(field, (entity.name.clone(), entity.key.name.clone(), kind));
        }
    }
    roots
}

/// Builds the schema for `catalog`.
pub fn build(
    pool: PgPool,
    catalog: Arc<Catalog>,
    limits: &Limits,
    settings: &GraphqlSettings,
) -> Result<Schema, BuildError> {
    check_names(&catalog)?;
    let mut query = Object::new("Query");
    let mut mutation = Object::new("Mutation");
    let mut shape = Shape::default();
    let mut builder_types: Vec<async_graphql::dynamic::Type> = vec![
        Scalar::new("JSON").into(),
        text_scalar(
            "BigInt",
            "A 64-bit integer, answered as a string (exact in every client); a number is accepted too.",
            |t| t.parse::<i64>().is_ok(),
        )
        .into(),
        text_scalar(
            "Decimal",
            "An exact decimal (PostgreSQL numeric), answered as a string; a number is accepted too.",
            is_decimal,
        )
        .into(),
        Enum::new("OrderDirection").item("ASC").item("DESC").into(),
    ];
    for name in SCALARS {
        let mut filter = InputObject::new(format!("{name}Filter"));
        for operator in ["eq", "neq", "gt", "gte", "lt", "lte"] {
            filter = filter.field(InputValue::new(operator, TypeRef::named(name)));
        }
        filter = filter
            .field(InputValue::new("in", TypeRef::named_nn_list(name)))
            .field(InputValue::new("like", TypeRef::named(TypeRef::STRING)))
            .field(InputValue::new("is_null", TypeRef::named(TypeRef::BOOLEAN)));
        builder_types.push(filter.into());
    }

    for entity in catalog.entities.values() {
        builder_types.extend(entity_types(entity, &catalog));
        let name = entity.name.clone();
        let key_type = TypeRef::named_nn(entity.key.graphql_type());
        let key_name = entity.key.name.clone();
        let single = lower_first(&name);
        shape.add("Query", &single, &name, false);
        shape.add("Query", &format!("{single}List"), &name, true);
        for op in ["create", "update", "delete", "upsert"] {
            shape.add("Mutation", &format!("{op}{name}"), &name, false);
        }
        shape.add("Mutation", &format!("create{name}List"), &name, true);
        for (relation_name, relation) in &entity.relations {
            let list = relation.kind == RelationKind::Many;
            shape.add(&name, relation_name, &relation.entity, list);
        }

        let root = |field: String, ty: TypeRef, kind: Root| {
            root_field(field, ty, name.clone(), key_name.clone(), kind)
        };
        query = query.field(
            root(single.clone(), TypeRef::named(&name), Root::ByKey)
                .argument(InputValue::new(key_name.clone(), key_type.clone())),
        );
        query = query.field(list_arguments(
            root(
                format!("{single}List"),
                TypeRef::named_nn_list(&name),
                Root::List,
            ),
            &name,
            entity.key.graphql_type(),
        ));
        query = query.field(
            root(
                format!("{single}Aggregate"),
                TypeRef::named_nn(format!("{name}Aggregate")),
                Root::Aggregate,
            )
            .argument(InputValue::new(
                "where",
                TypeRef::named(format!("{name}Where")),
            )),
        );
        let input = || InputValue::new("input", TypeRef::named_nn(format!("{name}Input")));
        let key = || InputValue::new(key_name.clone(), key_type.clone());
        mutation = mutation
            .field(
                root(format!("create{name}"), TypeRef::named(&name), Root::Create)
                    .argument(input()),
            )
            .field(
                root(format!("update{name}"), TypeRef::named(&name), Root::Update)
                    .argument(key())
                    .argument(input()),
            )
            .field(
                root(format!("delete{name}"), TypeRef::named(&name), Root::Delete).argument(key()),
            )
            .field(
                root(
                    format!("create{name}List"),
                    TypeRef::named_nn_list_nn(&name),
                    Root::CreateMany,
                )
                .argument(InputValue::new(
                    "inputs",
                    TypeRef::named_nn_list_nn(format!("{name}Input")),
                )),
            )
            .field(
                root(format!("upsert{name}"), TypeRef::named(&name), Root::Upsert)
                    .argument(input()),
            );
    }

    let has_entities = !catalog.entities.is_empty();
    let mut builder = Schema::build("Query", has_entities.then_some("Mutation"), None)
        .register(query)
        .limit_directives(limits.max_directives)
        .extension(Budget::new(shape, limits.clone()));
    if !settings.introspection {
        builder = builder.disable_introspection();
    }
    if settings.persisted_queries > 0 {
        builder = builder.extension(ApolloPersistedQueries::new(LruCacheStorage::new(
            settings.persisted_queries,
        )));
    }
    if has_entities {
        builder = builder.register(mutation);
    }
    for ty in builder_types {
        builder = builder.register(ty);
    }
    Ok(builder
        .data(Backend {
            pool,
            catalog,
            limits: limits.clone(),
        })
        .finish()?)
}

/// The kinds of root field; each compiles to one statement.
#[derive(Debug, Clone, Copy)]
enum Root {
    ByKey,
    List,
    Aggregate,
    Create,
    CreateMany,
    Upsert,
    Update,
    Delete,
}

fn root_field(name: String, ty: TypeRef, entity: String, key_arg: String, kind: Root) -> Field {
    Field::new(name, ty, move |ctx| {
        let (entity, key_arg) = (entity.clone(), key_arg.clone());
        FieldFuture::new(async move {
            let resolved = resolve_root(&ctx, &entity, &key_arg, kind).await;
            Ok(reported(&ctx, resolved))
        })
    })
}

/// Records a failed root field as an error carrying its path and the request id, the field
/// itself becoming null. (The dynamic schema leaves the path off errors returned from a
/// resolver.) A database refusal is logged in full under the same request id.
fn reported(
    ctx: &ResolverContext<'_>,
    resolved: Result<Option<FieldValue<'static>>, ResolveError>,
) -> Option<FieldValue<'static>> {
    match resolved {
        Ok(value) => value,
        Err(e) => {
            let request_id = ctx
                .data_opt::<RequestContext>()
                .map(|r| r.request_id.clone())
                .unwrap_or_default();
            let message = match &e {
                ResolveError::Database { code, message } => {
                    tracing::warn!(%request_id, code = code.as_deref().unwrap_or(""), error = %message, "the database refused a statement");
                    format!("{e} (request id {request_id})")
                }
                _ => e.to_string(),
            };
            let error = async_graphql::Error::new(message)
                .extend_with(|_, extensions| extensions.set("request_id", request_id))
                .into_server_error(ctx.ctx.item.pos);
            ctx.ctx.add_error(ctx.ctx.set_error_path(error));
            None
        }
    }
}

async fn resolve_root(
    ctx: &ResolverContext<'_>,
    entity: &str,
    key_arg: &str,
    kind: Root,
) -> Result<Option<FieldValue<'static>>, ResolveError> {
    let selection = selection(ctx)?;
    let backend = ctx
        .data::<Backend>()
        .map_err(|e| ResolveError::Engine(e.message))?;
    let caller = ctx
        .data_opt::<RequestContext>()
        .map(|r| r.caller.clone())
        .unwrap_or(Caller::Anonymous);
    let claim = |name: &str| caller.claim(name);
    let compiler = Compiler::new(&backend.catalog, &backend.limits).with_access(Access {
        anonymous: caller == Caller::Anonymous,
        roles: caller.roles(),
        claim: &claim,
    });
    let governed = backend
        .catalog
        .entity(entity)
        .is_some_and(|e| !e.permissions.is_empty());
    let request = match kind {
        Root::ByKey | Root::List | Root::Aggregate => None,
        _ => Some(writer(ctx, governed)?),
    };
    let compiler = match request {
        Some(request) => compiler.writing_for(
            request.caller.actor().unwrap_or_default().to_owned(),
            request.traceparent.clone().unwrap_or_default(),
        ),
        None => compiler,
    };
    let children = &selection.children;
    let statement = match kind {
        Root::ByKey => compiler.by_key(entity, &argument(ctx, key_arg), children)?,
        Root::List => compiler.list(entity, &ListArgs::of(&selection), children)?,
        Root::Aggregate => compiler.aggregate(entity, selection.argument("where"), children)?,
        Root::Create => compiler.create(entity, &argument(ctx, "input"), children)?,
        Root::CreateMany => compiler.create_many(entity, &argument(ctx, "inputs"), children)?,
        Root::Upsert => compiler.upsert(entity, &argument(ctx, "input"), children)?,
        Root::Update => {
            let (key, input) = (argument(ctx, key_arg), argument(ctx, "input"));
            compiler.update(entity, &key, &input, children)?
        }
        Root::Delete => compiler.delete(entity, &argument(ctx, key_arg), children)?,
    };
    let row = fetch(backend, &statement).await?;
    let op = match kind {
        Root::ByKey | Root::List | Root::Aggregate => None,
        Root::Create | Root::CreateMany => Some("create"),
        Root::Upsert => Some("upsert"),
        Root::Update => Some("update"),
        Root::Delete => Some("delete"),
    };
    if let Some(op) = op {
        count_mutation(entity, op);
    }
    Ok(row.map(match kind {
        Root::List | Root::CreateMany => list_value,
        _ => object_value,
    }))
}

fn count_mutation(entity: &str, op: &'static str) {
    metrics::counter!("herald_gateway_mutations_total", "entity" => entity.to_owned(), "op" => op)
        .increment(1);
}

/// The entity's object type and its input types.
fn entity_types(entity: &CheckedEntity, catalog: &Catalog) -> Vec<async_graphql::dynamic::Type> {
    let name = &entity.name;
    let mut object = Object::new(name);
    let mut filter = InputObject::new(format!("{name}Where"))
        .field(InputValue::new(
            "and",
            TypeRef::named_nn_list(format!("{name}Where")),
        ))
        .field(InputValue::new(
            "or",
            TypeRef::named_nn_list(format!("{name}Where")),
        ));
    let mut order = InputObject::new(format!("{name}OrderBy"));
    let mut input = InputObject::new(format!("{name}Input"));
    for column in &entity.columns {
        let ty = column.graphql_type();
        let field_type = if column.name == entity.key.name {
            TypeRef::named_nn(ty)
        } else {
            TypeRef::named(ty)
        };
        object = object.field(Field::new(column.name.clone(), field_type, scalar_entry));
        filter = filter.field(InputValue::new(
            column.name.clone(),
            TypeRef::named(format!("{ty}Filter")),
        ));
        order = order.field(InputValue::new(
            column.name.clone(),
            TypeRef::named("OrderDirection"),
        ));
        input = input.field(InputValue::new(column.name.clone(), TypeRef::named(ty)));
    }
    for (relation_name, relation) in &entity.relations {
        let Some(target) = catalog.entity(&relation.entity) else {
            continue;
        };
        let target_key = target.key.graphql_type();
        match relation.kind {
            RelationKind::One => {
                object = object.field(Field::new(
                    relation_name.clone(),
                    TypeRef::named(&relation.entity),
                    |ctx| {
                        resolved(
                            response_entry(&ctx)
                                .map(|value| Some(value).filter(|v| !v.is_null()).map(borrowed)),
                        )
                    },
                ))
            }
            RelationKind::Many => {
                object = object.field(list_arguments(
                    Field::new(
                        relation_name.clone(),
                        TypeRef::named_nn_list_nn(&relation.entity),
                        |ctx| {
                            resolved(response_entry(&ctx).map(|value| Some(borrowed_list(value))))
                        },
                    ),
                    &relation.entity,
                    target_key,
                ))
            }
        }
    }
    let aggregate = Object::new(format!("{name}Aggregate")).field(Field::new(
        "count",
        TypeRef::named_nn(TypeRef::INT),
        scalar_entry,
    ));
    vec![
        object.into(),
        filter.into(),
        order.into(),
        input.into(),
        aggregate.into(),
    ]
}

fn list_arguments(field: Field, entity: &str, key_type: &str) -> Field {
    field
        .argument(InputValue::new(
            "where",
            TypeRef::named(format!("{entity}Where")),
        ))
        .argument(InputValue::new(
            "order_by",
            TypeRef::named_nn_list(format!("{entity}OrderBy")),
        ))
        .argument(InputValue::new("limit", TypeRef::named(TypeRef::INT)))
        .argument(InputValue::new("offset", TypeRef::named(TypeRef::INT)))
        .argument(InputValue::new("after", TypeRef::named(key_type)))
}

const JSON_NULL: serde_json::Value = serde_json::Value::Null;

/// The value the parent's statement returned under this field's response key, borrowed: the
/// whole answer is one JSON tree and every field below the root reads its part of it.
fn response_entry<'a>(ctx: &ResolverContext<'a>) -> async_graphql::Result<&'a serde_json::Value> {
    let parent = ctx.parent_value.try_downcast_ref::<serde_json::Value>()?;
    let field = ctx.field();
    let key = field.alias().unwrap_or(field.name());
    Ok(parent.get(key).unwrap_or(&JSON_NULL))
}

/// A resolver's answer without an async hop: these fields only read JSON already fetched.
fn resolved(value: async_graphql::Result<Option<FieldValue<'_>>>) -> FieldFuture<'_> {
    match value {
        Ok(value) => FieldFuture::Value(value),
        Err(e) => FieldFuture::new(async move { Err::<Option<FieldValue<'_>>, _>(e) }),
    }
}

fn scalar_entry(ctx: ResolverContext<'_>) -> FieldFuture<'_> {
    resolved(response_entry(&ctx).and_then(|value| {
        Value::from_json(value.clone())
            .map(|v| Some(FieldValue::value(v)))
            .map_err(|e| async_graphql::Error::new(e.to_string()))
    }))
}

fn borrowed(value: &serde_json::Value) -> FieldValue<'_> {
    FieldValue::borrowed_any(value)
}

fn borrowed_list(value: &serde_json::Value) -> FieldValue<'_> {
    match value {
        serde_json::Value::Array(items) => FieldValue::list(items.iter().map(borrowed)),
        _ => FieldValue::list(Vec::<FieldValue<'_>>::new()),
    }
}

fn object_value(value: serde_json::Value) -> FieldValue<'static> {
    FieldValue::owned_any(value)
}

fn list_value(value: serde_json::Value) -> FieldValue<'static> {
    match value {
        serde_json::Value::Array(items) => FieldValue::list(items.into_iter().map(object_value)),
        _ => FieldValue::list(Vec::<FieldValue<'static>>::new()),
    }
}

fn argument(ctx: &ResolverContext<'_>, name: &str) -> Value {
    ctx.args
        .get(name)
        .map(|v| v.as_value().clone())
        .unwrap_or(Value::Null)
}

/// The request a write runs for. On an entity with permissions the compiler decides who may
/// write; on one without, any authenticated caller may and an anonymous one may not.
fn writer<'a>(
    ctx: &ResolverContext<'a>,
    governed: bool,
) -> Result<&'a RequestContext, ResolveError> {
    match ctx.data_opt::<RequestContext>() {
        Some(request) if governed || request.caller.actor().is_some() => Ok(request),
        _ => Err(ResolveError::Unauthenticated),
    }
}

/// The resolver's field and everything below it, collected per the spec with the request's
/// variables substituted.
fn selection(ctx: &ResolverContext<'_>) -> Result<Selection, CollectError> {
    let env = &ctx.ctx.query_env;
    let lookup = |name: &str| budget::variable(&env.operation.node, &env.variables, name);
    Collector::new(&env.fragments, &lookup).field(&ctx.ctx.item.node)
}

/// Runs a statement: one round trip. A write is a single statement (its actor and trace set
/// inside it, see `Compiler::writing_for`), and so its own transaction.
async fn fetch(
    backend: &Backend,
    statement: &Statement,
) -> Result<Option<serde_json::Value>, ResolveError> {
    let mut query = sqlx::query_scalar::<_, Option<serde_json::Value>>(sqlx::AssertSqlSafe(
        statement.sql.clone(),
    ));
    for param in &statement.params {
        query = match param {
            Param::Text(text) => query.bind(text.clone()),
            Param::TextArray(items) => query.bind(items.clone()),
            Param::Int(n) => query.bind(*n),
        };
    }
    Ok(query.fetch_optional(&backend.pool).await?.flatten())
}
