//! Field collection as the GraphQL spec defines it (§6.3.2 CollectFields): fragment spreads and
//! inline fragments are expanded, `@skip`/`@include` are honoured on fields and fragments, and
//! fields sharing a response key (repeated, or arriving through several fragments) are merged
//! into one selection whose children are the union of theirs.
//!
//! The SQL compiler builds one `jsonb` object per selection set, so two entries under one key
//! would leave only the last one: merging here is what makes `{ customer { id } ...F }` with
//! `fragment F on Order { customer { name } }` answer both `id` and `name`.

use std::collections::{HashMap, HashSet};

use async_graphql::parser::types::{
    Directive, DocumentOperations, ExecutableDocument, Field, FragmentDefinition, OperationType,
    Selection as Item, SelectionSet,
};
use async_graphql::{Name, Positioned, Value, Variables};

use crate::budget;
use crate::query::Selection;

/// The type and merged root selections of the operation `operation_name` picks from the
/// document `text`, with `variables` substituted; `None` when the document cannot be read (the
/// engine answers why).
pub fn operation_selections(
    text: &str,
    operation_name: Option<&str>,
    variables: &Variables,
) -> Option<(OperationType, Vec<Selection>)> {
    let document = async_graphql::parser::parse_query(text).ok()?;
    document_selections(&document, operation_name, variables)
}

/// As `operation_selections`, for a document already parsed.
pub fn document_selections(
    document: &ExecutableDocument,
    operation_name: Option<&str>,
    variables: &Variables,
) -> Option<(OperationType, Vec<Selection>)> {
    let operation = match (&document.operations, operation_name) {
        (DocumentOperations::Single(operation), _) => operation,
        (DocumentOperations::Multiple(operations), Some(name)) => operations.get(name)?,
        (DocumentOperations::Multiple(_), None) => return None,
    };
    let lookup = |name: &str| budget::variable(&operation.node, variables, name);
    let selections = Collector::new(&document.fragments, &lookup)
        .collect(&operation.node.selection_set.node)
        .ok()?;
    Some((operation.node.ty, selections))
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CollectError {
    #[error("variable `${0}` is not defined")]
    UndefinedVariable(String),
    #[error("the `if` argument of @{0} must be a Boolean")]
    BadCondition(&'static str),
}

/// What a selection set is read against: the document's fragments and the request's variables
/// (defaults already applied).
pub struct Collector<'a> {
    fragments: &'a HashMap<Name, Positioned<FragmentDefinition>>,
    variables: &'a dyn Fn(&str) -> Option<Value>,
}

impl<'a> Collector<'a> {
    pub fn new(
        fragments: &'a HashMap<Name, Positioned<FragmentDefinition>>,
        variables: &'a dyn Fn(&str) -> Option<Value>,
    ) -> Self {
        Self {
            fragments,
            variables,
        }
    }

    /// The merged fields of `set`, in first-appearance order.
    pub fn collect(&self, set: &SelectionSet) -> Result<Vec<Selection>, CollectError> {
        let mut out = Vec::new();
        self.collect_into(set, &mut out, &mut HashSet::new())?;
        Ok(out)
    }

    /// `field` itself (its arguments resolved) with its merged children.
    pub fn field(&self, field: &Field) -> Result<Selection, CollectError> {
        self.field_with(field, &mut HashSet::new())
    }

    fn field_with(
        &self,
        field: &Field,
        expanding: &mut HashSet<Name>,
    ) -> Result<Selection, CollectError> {
        let arguments = field
            .arguments
            .iter()
            .map(|(name, value)| {
                let value = value.node.clone().into_const_with(|v| self.variable(&v))?;
                Ok((name.node.clone(), value))
            })
            .collect::<Result<Vec<_>, CollectError>>()?;
        let mut children = Vec::new();
        self.collect_into(&field.selection_set.node, &mut children, expanding)?;
        Ok(Selection {
            key: field.alias.as_ref().unwrap_or(&field.name).node.to_string(),
            field: field.name.node.to_string(),
            arguments,
            children,
        })
    }

    fn collect_into(
        &self,
        set: &SelectionSet,
        out: &mut Vec<Selection>,
        // Fragments being expanded on this path; validation refuses cycles, and this keeps an
        // unvalidated document (the limits check runs before validation) from looping.
        expanding: &mut HashSet<Name>,
    ) -> Result<(), CollectError> {
        for item in &set.items {
            match &item.node {
                Item::Field(field) => {
                    if self.included(&field.node.directives)? {
                        let selection = self.field_with(&field.node, expanding)?;
                        merge(out, selection);
                    }
                }
                Item::FragmentSpread(spread) => {
                    let name = &spread.node.fragment_name.node;
                    if !self.included(&spread.node.directives)? || expanding.contains(name) {
                        continue;
                    }
                    if let Some(fragment) = self.fragments.get(name) {
                        expanding.insert(name.clone());
                        self.collect_into(&fragment.node.selection_set.node, out, expanding)?;
                        expanding.remove(name);
                    }
                }
                Item::InlineFragment(inline) => {
                    if self.included(&inline.node.directives)? {
                        self.collect_into(&inline.node.selection_set.node, out, expanding)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// `@skip(if: true)` or `@include(if: false)` leaves the selection out.
    fn included(&self, directives: &[Positioned<Directive>]) -> Result<bool, CollectError> {
        for directive in directives {
            let (name, skip_when) = match directive.node.name.node.as_str() {
                "skip" => ("skip", true),
                "include" => ("include", false),
                _ => continue,
            };
            let condition = directive
                .node
                .get_argument("if")
                .map(|value| value.node.clone().into_const_with(|v| self.variable(&v)))
                .transpose()?;
            match condition {
                Some(Value::Boolean(value)) if value == skip_when => return Ok(false),
                Some(Value::Boolean(_)) => {}
                _ => return Err(CollectError::BadCondition(name)),
            }
        }
        Ok(true)
    }

    fn variable(&self, name: &Name) -> Result<Value, CollectError> {
        (self.variables)(name.as_str())
            .ok_or_else(|| CollectError::UndefinedVariable(name.to_string()))
    }
}

/// Adds `selection` under its response key, merging children with an earlier one of that key.
/// (Validation guarantees merged fields name the same field with the same arguments.)
fn merge(into: &mut Vec<Selection>, selection: Selection) {
    match into.iter_mut().find(|s| s.key == selection.key) {
        Some(existing) => {
            for child in selection.children {
                merge(&mut existing.children, child);
            }
        }
        None => into.push(selection),
    }
}

#[cfg(test)]
mod tests {
    use async_graphql::parser::parse_query;
    use async_graphql::parser::types::DocumentOperations;

    use super::*;

    fn collect(query: &str, variables: &[(&str, Value)]) -> Vec<Selection> {
        let document = parse_query(query).expect("parses");
        let operation = match &document.operations {
            DocumentOperations::Single(operation) => operation.clone(),
            DocumentOperations::Multiple(operations) => {
                operations.values().next().expect("an operation").clone()
            }
        };
        let lookup = |name: &str| {
            variables
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        };
        Collector::new(&document.fragments, &lookup)
            .collect(&operation.node.selection_set.node)
            .expect("collects")
    }

    /// The tree as `key(field)[children]` text, easy to compare.
    fn shape(selections: &[Selection]) -> String {
        selections
            .iter()
            .map(|s| {
                let head = if s.key == s.field {
                    s.key.clone()
                } else {
                    format!("{}:{}", s.key, s.field)
                };
                if s.children.is_empty() {
                    head
                } else {
                    format!("{head}{{{}}}", shape(&s.children))
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn fragments_repeated_fields_and_aliases_merge_by_response_key() {
        let cases = [
            (
                "{ orderList { customer { id } ...F } } fragment F on Order { customer { name } }",
                "orderList{customer{id name}}",
            ),
            (
                "{ orderList { id ... on Order { id status } ... { customer { id } } customer { id name } } }",
                "orderList{id status customer{id name}}",
            ),
            (
                "{ a: customer(id: 1) { n: name name } a: customer(id: 1) { email } }",
                "a:customer{n:name name email}",
            ),
            (
                "{ orderList { ...A } } fragment A on Order { ...B id } fragment B on Order { status ...A }",
                "orderList{status id}",
            ),
        ];
        for (query, expected) in cases {
            assert_eq!(shape(&collect(query, &[])), expected, "{query}");
        }
    }

    #[test]
    fn skip_and_include_leave_fields_and_fragments_out() {
        let query = "query($yes: Boolean!, $no: Boolean!) { orderList {
            id
            status @skip(if: $yes)
            note @include(if: $no)
            customer @include(if: $yes) { id }
            ...F @skip(if: true)
            ... @include(if: false) { total }
            ... @include(if: $yes) { meta }
        } } fragment F on Order { customer_id }";
        let got = collect(
            query,
            &[("yes", Value::Boolean(true)), ("no", Value::Boolean(false))],
        );
        assert_eq!(shape(&got), "orderList{id customer{id} meta}");
    }

    #[test]
    fn variables_reach_the_arguments() {
        let got = collect(
            "query($n: Int) { orderList(limit: $n) { id } }",
            &[("n", Value::from(3))],
        );
        assert_eq!(got[0].arguments, vec![(Name::new("limit"), Value::from(3))]);
    }
}
