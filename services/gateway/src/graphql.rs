//! The GraphQL schema, built at start from the checked catalogue with async-graphql's dynamic
//! schema (spec-compliant parsing, validation, introspection, depth and complexity limits), and
//! the resolvers of its root fields. A root resolver compiles its whole selection to one
//! statement (`query.rs`) and runs it; the per-field resolvers below it only read the JSON the
//! statement returned.

use std::sync::Arc;

use async_graphql::Value;
use async_graphql::dynamic::{
    Enum, Field, FieldFuture, FieldValue, InputObject, InputValue, Object, ResolverContext, Scalar,
    Schema, SchemaError, TypeRef,
};
use sqlx::PgPool;

use crate::auth::Caller;
use crate::capture::{ACTOR_SETTING, TRACEPARENT_SETTING};
use crate::query::{Compiler, ListArgs, Param, QueryError, Selection, Statement};
use crate::schema::{Catalog, CheckedEntity, FieldType, RelationKind};
use crate::settings::Limits;

const SCALARS: [FieldType; 6] = [
    FieldType::ID,
    FieldType::Int,
    FieldType::Float,
    FieldType::String,
    FieldType::Boolean,
    FieldType::JSON,
];

/// What every resolver needs, stored in the schema's data.
struct Backend {
    pool: PgPool,
    catalog: Arc<Catalog>,
    limits: Limits,
}

/// Per-request data: who calls, and the trace to hand to the events it causes.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub caller: Caller,
    pub traceparent: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error("mutations require an authenticated caller (a JWT or an API key)")]
    Unauthenticated,
    #[error("database error: {0}")]
    Database(String),
    #[error("the statement exceeded the statement timeout and was cancelled")]
    Timeout,
    #[error("{0}")]
    Engine(String),
}

impl From<sqlx::Error> for ResolveError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            // 57014: query_canceled, which is how statement_timeout ends a statement.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("57014") => {
                ResolveError::Timeout
            }
            sqlx::Error::Database(db) => ResolveError::Database(db.message().to_owned()),
            _ => ResolveError::Database(e.to_string()),
        }
    }
}

fn lower_first(name: &str) -> String {
    let mut chars = name.chars();
    chars
        .next()
        .map(|c| c.to_ascii_lowercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

/// Builds the schema for `catalog`.
pub fn build(pool: PgPool, catalog: Arc<Catalog>, limits: &Limits) -> Result<Schema, SchemaError> {
    let mut query = Object::new("Query");
    let mut mutation = Object::new("Mutation");
    let mut builder_types: Vec<async_graphql::dynamic::Type> = Vec::new();

    builder_types.push(Scalar::new("JSON").into());
    builder_types.push(Enum::new("OrderDirection").item("ASC").item("DESC").into());
    for scalar in SCALARS {
        let name = scalar.graphql_name();
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
        let key_type = TypeRef::named_nn(entity.key.field_type.graphql_name());
        let key_name = entity.key.name.clone();
        let single = lower_first(&name);

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
        ));
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
            );
    }

    let has_entities = !catalog.entities.is_empty();
    let mut builder = Schema::build("Query", has_entities.then_some("Mutation"), None)
        .register(query)
        .limit_depth(limits.max_depth)
        .limit_complexity(limits.max_complexity);
    if has_entities {
        builder = builder.register(mutation);
    }
    for ty in builder_types {
        builder = builder.register(ty);
    }
    builder
        .data(Backend {
            pool,
            catalog,
            limits: limits.clone(),
        })
        .finish()
}

/// The kinds of root field; each compiles to one statement.
#[derive(Debug, Clone, Copy)]
enum Root {
    ByKey,
    List,
    Create,
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

/// Records a failed root field as an error carrying its path, the field itself becoming null.
/// (The dynamic schema leaves the path off errors returned from a resolver.)
fn reported(
    ctx: &ResolverContext<'_>,
    resolved: Result<Option<FieldValue<'static>>, ResolveError>,
) -> Option<FieldValue<'static>> {
    match resolved {
        Ok(value) => value,
        Err(e) => {
            let error =
                async_graphql::Error::new(e.to_string()).into_server_error(ctx.ctx.item.pos);
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
    let selection = selection(ctx).map_err(|e| ResolveError::Engine(e.message))?;
    let backend = ctx
        .data::<Backend>()
        .map_err(|e| ResolveError::Engine(e.message))?;
    let compiler = Compiler::new(&backend.catalog, &backend.limits);
    let children = &selection.children;
    let (statement, request) = match kind {
        Root::ByKey => (
            compiler.by_key(entity, &argument(ctx, key_arg), children)?,
            None,
        ),
        Root::List => (
            compiler.list(entity, &ListArgs::of(&selection), children)?,
            None,
        ),
        Root::Create => {
            let request = authenticated(ctx)?;
            (
                compiler.create(entity, &argument(ctx, "input"), children)?,
                Some(request),
            )
        }
        Root::Update => {
            let request = authenticated(ctx)?;
            let (key, input) = (argument(ctx, key_arg), argument(ctx, "input"));
            (
                compiler.update(entity, &key, &input, children)?,
                Some(request),
            )
        }
        Root::Delete => {
            let request = authenticated(ctx)?;
            (
                compiler.delete(entity, &argument(ctx, key_arg), children)?,
                Some(request),
            )
        }
    };
    let row = fetch(backend, &statement, request).await?;
    let op = match kind {
        Root::ByKey | Root::List => None,
        Root::Create => Some("create"),
        Root::Update => Some("update"),
        Root::Delete => Some("delete"),
    };
    if let Some(op) = op {
        count_mutation(entity, op);
    }
    Ok(row.map(match kind {
        Root::List => list_value,
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
        let ty = column.field_type.graphql_name();
        let field_type = if column.name == entity.key.name {
            TypeRef::named_nn(ty)
        } else {
            TypeRef::named(ty)
        };
        object = object.field(Field::new(column.name.clone(), field_type, |ctx| {
            FieldFuture::new(async move {
                let value = response_entry(&ctx)?;
                Ok(Some(FieldValue::value(
                    Value::from_json(value)
                        .map_err(|e| async_graphql::Error::new(e.to_string()))?,
                )))
            })
        }));
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
        if catalog.entity(&relation.entity).is_none() {
            continue;
        }
        match relation.kind {
            RelationKind::One => {
                object = object.field(Field::new(
                    relation_name.clone(),
                    TypeRef::named(&relation.entity),
                    |ctx| {
                        FieldFuture::new(async move {
                            let value = response_entry(&ctx)?;
                            Ok(Some(value).filter(|v| !v.is_null()).map(object_value))
                        })
                    },
                ))
            }
            RelationKind::Many => {
                object = object.field(list_arguments(
                    Field::new(
                        relation_name.clone(),
                        TypeRef::named_nn_list_nn(&relation.entity),
                        |ctx| {
                            FieldFuture::new(async move {
                                let value = response_entry(&ctx)?;
                                Ok(Some(list_value(value)))
                            })
                        },
                    ),
                    &relation.entity,
                ))
            }
        }
    }
    vec![object.into(), filter.into(), order.into(), input.into()]
}

fn list_arguments(field: Field, entity: &str) -> Field {
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
}

/// The value the parent's statement returned under this field's response key.
fn response_entry(ctx: &ResolverContext<'_>) -> async_graphql::Result<serde_json::Value> {
    let parent = ctx.parent_value.try_downcast_ref::<serde_json::Value>()?;
    let field = ctx.field();
    let key = field.alias().unwrap_or(field.name());
    Ok(parent.get(key).cloned().unwrap_or(serde_json::Value::Null))
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

fn authenticated<'a>(ctx: &ResolverContext<'a>) -> Result<&'a RequestContext, ResolveError> {
    match ctx.data_opt::<RequestContext>() {
        Some(request) if request.caller.actor().is_some() => Ok(request),
        _ => Err(ResolveError::Unauthenticated),
    }
}

/// The resolver's field and everything below it, with variables already substituted.
fn selection(ctx: &ResolverContext<'_>) -> async_graphql::Result<Selection> {
    fn walk(field: async_graphql::SelectionField<'_>) -> async_graphql::Result<Selection> {
        Ok(Selection {
            key: field.alias().unwrap_or(field.name()).to_owned(),
            field: field.name().to_owned(),
            arguments: field.arguments()?,
            children: field
                .selection_set()
                .map(walk)
                .collect::<async_graphql::Result<Vec<_>>>()?,
        })
    }
    walk(ctx.field())
}

/// Runs a statement. A mutation runs in a transaction that first records the actor and trace
/// for the capture trigger (`set_config(..., true)` is transaction-local, so a pooled connection
/// never carries one caller's identity into another's request); a query is one round trip.
async fn fetch(
    backend: &Backend,
    statement: &Statement,
    mutation: Option<&RequestContext>,
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
    let Some(request) = mutation else {
        return Ok(query.fetch_optional(&backend.pool).await?.flatten());
    };
    let mut tx = backend.pool.begin().await?;
    sqlx::query("SELECT set_config($1, $2, true), set_config($3, $4, true)")
        .bind(ACTOR_SETTING)
        .bind(request.caller.actor().unwrap_or_default())
        .bind(TRACEPARENT_SETTING)
        .bind(request.traceparent.clone().unwrap_or_default())
        .execute(&mut *tx)
        .await?;
    let row = query.fetch_optional(&mut *tx).await?.flatten();
    tx.commit().await?;
    Ok(row)
}
