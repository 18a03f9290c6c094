//! What one request may cost, checked on the parsed document before anything runs: the depth
//! of its data selections, its size (fields, aliases) and the rows it can fetch, where a list
//! multiplies its subtree by its `limit` (or the default page size), so `limit: 1000` nested
//! three deep is 10⁹ rows and refused, not "cost 10".
//!
//! Introspection (`__schema`, `__type`, `__typename`) is no data and is not counted: a client
//! tool's standard introspection query nests `ofType` eight levels deep, and a depth limit that
//! refuses it makes the gateway unusable from GraphiQL, Apollo or codegen. Its nesting is still
//! bounded by the parser's recursion limit.

use std::collections::HashMap;
use std::sync::Arc;

use async_graphql::extensions::{Extension, ExtensionContext, ExtensionFactory, NextParseQuery};
use async_graphql::parser::types::{ExecutableDocument, OperationDefinition, OperationType};
use async_graphql::{ServerError, ServerResult, Value, Variables};

use crate::collect::{CollectError, Collector};
use crate::query::Selection;
use crate::settings::Limits;

/// Where a field leads: the object type it returns and whether it is a list of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub type_name: String,
    pub list: bool,
}

/// (parent type, field) → target, for every field that returns an object.
#[derive(Debug, Default, Clone)]
pub struct Shape(HashMap<(String, String), Target>);

impl Shape {
    pub fn add(&mut self, parent: &str, field: &str, type_name: &str, list: bool) {
        self.0.insert(
            (parent.to_owned(), field.to_owned()),
            Target {
                type_name: type_name.to_owned(),
                list,
            },
        );
    }

    fn get(&self, parent: &str, field: &str) -> Option<&Target> {
        self.0.get(&(parent.to_owned(), field.to_owned()))
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BudgetError {
    #[error(
        "Query is nested too deep: {depth} levels of data, the limit is {limit} (limits.max_depth)"
    )]
    Depth { depth: usize, limit: usize },
    #[error("Query is too complex: {fields} fields, the limit is {limit} (limits.max_complexity)")]
    Complexity { fields: usize, limit: usize },
    #[error("Query uses {aliases} aliases, the limit is {limit} (limits.max_aliases)")]
    Aliases { aliases: usize, limit: usize },
    #[error(
        "Query could fetch {rows} rows (each list counts its limit, or the default page size, \
         times its parents' rows); the budget is {limit} (limits.max_rows)"
    )]
    Rows { rows: u64, limit: u64 },
    #[error(transparent)]
    Collect(#[from] CollectError),
}

#[derive(Debug, Default, PartialEq)]
struct Tally {
    depth: usize,
    fields: usize,
    aliases: usize,
    rows: u64,
}

/// Checks every operation of `document` against `limits`.
pub fn check(
    document: &ExecutableDocument,
    variables: &Variables,
    shape: &Shape,
    limits: &Limits,
) -> Result<(), BudgetError> {
    for (_, operation) in document.operations.iter() {
        let tally = measure(document, &operation.node, variables, shape, limits)?;
        if tally.depth > limits.max_depth {
            return Err(BudgetError::Depth {
                depth: tally.depth,
                limit: limits.max_depth,
            });
        }
        if tally.fields > limits.max_complexity {
            return Err(BudgetError::Complexity {
                fields: tally.fields,
                limit: limits.max_complexity,
            });
        }
        if tally.aliases > limits.max_aliases {
            return Err(BudgetError::Aliases {
                aliases: tally.aliases,
                limit: limits.max_aliases,
            });
        }
        if tally.rows > limits.max_rows {
            return Err(BudgetError::Rows {
                rows: tally.rows,
                limit: limits.max_rows,
            });
        }
    }
    Ok(())
}

fn measure(
    document: &ExecutableDocument,
    operation: &OperationDefinition,
    variables: &Variables,
    shape: &Shape,
    limits: &Limits,
) -> Result<Tally, BudgetError> {
    let lookup = |name: &str| variable(operation, variables, name);
    let fields =
        Collector::new(&document.fragments, &lookup).collect(&operation.selection_set.node)?;
    let root = match operation.ty {
        OperationType::Query => "Query",
        OperationType::Mutation => "Mutation",
        OperationType::Subscription => "Subscription",
    };
    let mut tally = Tally::default();
    walk(&fields, root, 1, 1, shape, limits, &mut tally);
    Ok(tally)
}

/// A variable's value, else its declared default (as execution will see it).
pub fn variable(
    operation: &OperationDefinition,
    variables: &Variables,
    name: &str,
) -> Option<Value> {
    operation
        .variable_definitions
        .iter()
        .find(|definition| definition.node.name.node == name)
        .and_then(|definition| {
            variables
                .get(&definition.node.name.node)
                .or_else(|| definition.node.default_value())
        })
        .cloned()
}

fn walk(
    fields: &[Selection],
    parent: &str,
    depth: usize,
    rows: u64,
    shape: &Shape,
    limits: &Limits,
    tally: &mut Tally,
) {
    for field in fields {
        if field.field.starts_with("__") {
            continue;
        }
        tally.depth = tally.depth.max(depth);
        tally.fields += 1;
        if field.key != field.field {
            tally.aliases += 1;
        }
        let Some(target) = shape.get(parent, &field.field) else {
            continue;
        };
        let rows = if target.list {
            let page = match field.argument("limit") {
                Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
                _ => u64::from(limits.default_limit),
            };
            rows.saturating_mul(page)
        } else {
            rows
        };
        tally.rows = tally.rows.saturating_add(rows);
        walk(
            &field.children,
            &target.type_name,
            depth + 1,
            rows,
            shape,
            limits,
            tally,
        );
    }
}

/// The extension that runs `check` on every parsed request.
pub struct Budget {
    shape: Arc<Shape>,
    limits: Limits,
}

impl Budget {
    pub fn new(shape: Shape, limits: Limits) -> Self {
        Self {
            shape: Arc::new(shape),
            limits,
        }
    }
}

impl ExtensionFactory for Budget {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(BudgetCheck {
            shape: self.shape.clone(),
            limits: self.limits.clone(),
        })
    }
}

struct BudgetCheck {
    shape: Arc<Shape>,
    limits: Limits,
}

#[async_graphql::async_trait::async_trait]
impl Extension for BudgetCheck {
    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let document = next.run(ctx, query, variables).await?;
        check(&document, variables, &self.shape, &self.limits)
            .map_err(|e| ServerError::new(e.to_string(), None))?;
        Ok(document)
    }
}

#[cfg(test)]
mod tests {
    use async_graphql::parser::parse_query;

    use super::*;

    fn shape() -> Shape {
        let mut shape = Shape::default();
        shape.add("Query", "customer", "Customer", false);
        shape.add("Query", "customerList", "Customer", true);
        shape.add("Customer", "orders", "Order", true);
        shape.add("Order", "customer", "Customer", false);
        shape
    }

    fn tally(query: &str) -> Tally {
        let document = parse_query(query).expect("parses");
        let (_, operation) = document.operations.iter().next().expect("an operation");
        measure(
            &document,
            &operation.node,
            &Variables::default(),
            &shape(),
            &Limits::default(),
        )
        .expect("measures")
    }

    #[test]
    fn lists_multiply_the_rows_of_their_subtree() {
        let nested = tally(
            "{ customerList(limit: 1000) { orders(limit: 1000) { customer { orders(limit: 1000) { id } } } } }",
        );
        assert_eq!(nested.rows, 1000 + 1_000_000 + 1_000_000 + 1_000_000_000);
        let err = check(
            &parse_query("{ customerList(limit: 1000) { orders(limit: 1000) { id } } }")
                .expect("parses"),
            &Variables::default(),
            &shape(),
            &Limits::default(),
        )
        .expect_err("over the row budget");
        assert!(err.to_string().contains("max_rows"), "{err}");
        let small = tally("{ customer(id: 1) { orders { id } } }");
        assert_eq!(small.rows, 1 + u64::from(Limits::default().default_limit));
    }

    #[test]
    fn introspection_is_neither_depth_nor_cost() {
        let deep = format!(
            "{{ __schema {{ types {{ fields {{ type {{ {} name {} }} }} }} }} }}",
            "ofType { ".repeat(8),
            "} ".repeat(8)
        );
        assert_eq!(tally(&deep), Tally::default());
        let data = tally("{ customer(id: 1) { __typename orders { customer { name } } } }");
        assert_eq!((data.depth, data.fields), (4, 4));
    }

    #[test]
    fn aliases_are_counted_and_skipped_fields_are_free() {
        let t = tally("{ a: customer(id: 1) { n: name } b: customerList @skip(if: true) { id } }");
        assert_eq!((t.aliases, t.fields, t.rows), (2, 2, 1));
    }
}
