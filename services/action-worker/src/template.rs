//! The small template language of action configs: `{{ path.to.field }}` is replaced by the value
//! at that path of the triggering event's JSON (`{{data.email}}`, `{{entity}}`, `{{key}}`).
//! Strings are inserted as they are, other values as JSON, a missing path as nothing — the same
//! forgiving rule as Mustache, so a template never fails an action by itself.

use serde_json::Value;

pub fn render(template: &str, context: &Value) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else {
            break;
        };
        out.push_str(&rest[..start]);
        let path = rest[start + 2..start + 2 + len].trim();
        match lookup(context, path) {
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Null) | None => {}
            Some(other) => out.push_str(&other.to_string()),
        }
        rest = &rest[start + 2 + len + 2..];
    }
    out.push_str(rest);
    out
}

fn lookup<'a>(context: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(context, |value, part| match value {
            Value::Array(items) => items.get(part.parse::<usize>().ok()?),
            _ => value.get(part),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_are_substituted_by_dotted_path() {
        let event = json!({"entity": "Order", "data": {"id": 42, "who": {"name": "Ada"}, "tags": ["a", "b"]}});
        assert_eq!(
            render(
                "{{entity}} #{{ data.id }} for {{data.who.name}} [{{data.tags.1}}]",
                &event
            ),
            "Order #42 for Ada [b]"
        );
    }

    #[test]
    fn missing_fields_render_as_nothing_and_unclosed_braces_stay() {
        let event = json!({"data": null});
        assert_eq!(render("x{{data.nope}}y {{oops", &event), "xy {{oops");
    }
}
