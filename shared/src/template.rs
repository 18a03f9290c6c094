//! The small template language of action configs: `{{ path.to.field }}` is replaced by the value
//! at that path of the triggering event's JSON (`{{data.email}}`, `{{entity}}`, `{{key}}`).
//! Strings are inserted as they are, other values as JSON, a missing path as nothing — the same
//! forgiving rule as Mustache, so a template never fails an action by itself.
//!
//! Because a render cannot fail, mistakes are caught where the templates are read: `problems`
//! is what the dispatcher's observers loader (at start, on reload, in `--check-config` and
//! `herald observers check`) runs on every string of a built-in action's settings. It refuses
//! what could never render anything: an unclosed `{{`, an empty path, a field the event does not
//! have (`{{dat.email}}`) or a path into a field that has no fields (`{{entity.name}}`). Paths
//! inside the row (`data.*`, `before.*`) depend on the entity's columns and are not checked.

use serde_json::Value;

/// The fields of an EntityEvent, the context every template renders against.
pub const EVENT_FIELDS: [&str; 11] = [
    "id",
    "entity",
    "op",
    "key",
    "data",
    "before",
    "changed",
    "at",
    "actor",
    "tx",
    "schema_version",
];

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

/// What is wrong with a template, one sentence per mistake; empty when it is fine.
pub fn problems(template: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else {
            found.push(format!(
                "`{}` is never closed with `}}}}`",
                excerpt(&rest[start..])
            ));
            break;
        };
        let path = rest[start + 2..start + 2 + len].trim();
        if let Some(problem) = path_problem(path) {
            let written = &rest[start..start + 2 + len + 2];
            found.push(format!("`{written}`: {problem}"));
        }
        rest = &rest[start + 2 + len + 2..];
    }
    found
}

fn path_problem(path: &str) -> Option<String> {
    if path.is_empty() {
        return Some("names no field".into());
    }
    let parts: Vec<&str> = path.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Some("has an empty part between dots".into());
    }
    let (field, inside) = (parts[0], &parts[1..]);
    match field {
        // The row's columns depend on the entity: anything may be inside.
        "data" | "before" => None,
        "changed" => match inside {
            [] => None,
            [index] if index.parse::<usize>().is_ok() => None,
            _ => {
                Some("`changed` is a list of field names: only `changed.<n>` reaches inside".into())
            }
        },
        _ if EVENT_FIELDS.contains(&field) => {
            (!inside.is_empty()).then(|| format!("`{field}` is a single value, it has no fields"))
        }
        _ => Some(format!(
            "the event has no field `{field}` (it has {}; the row's columns are under `data.`)",
            EVENT_FIELDS.join(", ")
        )),
    }
}

/// The start of a template, short enough for a message.
fn excerpt(text: &str) -> String {
    let mut end = text.len().min(40);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
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

    #[test]
    fn templates_that_can_render_have_no_problems() {
        for fine in [
            "",
            "no template at all",
            "{{entity}} {{ key }} {{op}} {{id}} {{at}} {{actor}} {{tx}} {{schema_version}}",
            "{{data.customer.email}} was {{before.status}}, changed {{changed}} {{changed.0}}",
            "}} alone is text",
        ] {
            assert_eq!(problems(fine), Vec::<String>::new(), "{fine}");
        }
    }

    #[test]
    fn every_template_mistake_is_named() {
        let cases = [
            ("Hi {{dat.email}}", "no field `dat`"),
            ("{{ entity.name }}", "`entity` is a single value"),
            ("{{}}", "names no field"),
            ("{{data..email}}", "empty part"),
            ("{{changed.status}}", "`changed` is a list"),
            ("order {{key", "never closed"),
        ];
        for (template, says) in cases {
            let found = problems(template);
            assert_eq!(found.len(), 1, "{template}: {found:?}");
            assert!(found[0].contains(says), "{template}: {found:?}");
        }
        assert_eq!(
            problems("{{a}} and {{b.c}}").len(),
            2,
            "every mistake, not the first"
        );
    }
}
