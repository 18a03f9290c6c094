//! Puts an engine answer's keys in the order the GraphQL spec gives them (CollectFields order).
//!
//! async-graphql 7 resolves a selection set's fields in parallel and inserts each result as it
//! completes, so two root fields that each wait on PostgreSQL (or one field selected twice)
//! answer in whichever order their statements finish. Clients that read the response as an
//! ordered map (and the compiled-plan path, which already answers in selection order) must see
//! one order, so the engine's answer is re-ordered against the document's collected selections.

use async_graphql::Value;

use crate::query::Selection;

/// Re-orders every object in `value` to follow `selections` (keys it does not name keep their
/// relative order after the named ones); lists are re-ordered element by element.
pub fn in_selection_order(value: &mut Value, selections: &[Selection]) {
    match value {
        Value::Object(map) => {
            let mut unordered = std::mem::take(map);
            for selection in selections {
                if let Some((key, mut child)) = unordered.shift_remove_entry(selection.key.as_str())
                {
                    in_selection_order(&mut child, &selection.children);
                    map.insert(key, child);
                }
            }
            map.extend(unordered);
        }
        Value::List(items) => {
            for item in items {
                in_selection_order(item, selections);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::operation_selections;
    use async_graphql::Variables;

    #[test]
    fn a_field_selected_twice_answers_in_first_appearance_order_whatever_finished_first() {
        let (_, selections) = operation_selections(
            "{ customer(id: 3) { name } customer(id: 3) { email } list { b a } }",
            None,
            &Variables::default(),
        )
        .expect("selections");
        let mut value = Value::from_json(serde_json::json!({
            "list": [{"a": 1, "b": 2}, {"a": 3, "b": 4}],
            "customer": {"email": "ada@example.com", "name": "Ada"},
        }))
        .expect("value");
        in_selection_order(&mut value, &selections);
        let text = serde_json::to_string(&value).expect("text");
        assert_eq!(
            text,
            r#"{"customer":{"name":"Ada","email":"ada@example.com"},"list":[{"b":2,"a":1},{"b":4,"a":3}]}"#
        );
    }
}
