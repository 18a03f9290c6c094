//! NATS subject patterns (`*` one token, `>` one or more trailing tokens), and the one operation
//! the CLI needs on them: the intersection of two patterns.
//!
//! `herald tail herald.*.Order.>` has to become a consumer filter on each stream it touches, and
//! JetStream refuses a filter that is not inside the stream's own subjects. The intersection of
//! two token patterns is itself a token pattern (or nothing), so the filter for each stream is
//! exact: `herald.events.Order.>` on HERALD_EVENTS, and no consumer at all on HERALD_JOBS.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{pattern}` is not a subject filter: {reason}")]
pub struct InvalidPattern {
    pub pattern: String,
    pub reason: &'static str,
}

/// Checks that `pattern` is a well-formed subject filter.
pub fn validate(pattern: &str) -> Result<(), InvalidPattern> {
    let fail = |reason| {
        Err(InvalidPattern {
            pattern: pattern.to_owned(),
            reason,
        })
    };
    let tokens: Vec<&str> = pattern.split('.').collect();
    if tokens.iter().any(|t| t.is_empty()) {
        return fail("it has an empty token");
    }
    if pattern.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return fail("it contains white space or a control character");
    }
    for (i, token) in tokens.iter().enumerate() {
        if token.len() > 1 && token.contains(['*', '>']) {
            return fail("a wildcard must be a whole token");
        }
        if *token == ">" && i + 1 != tokens.len() {
            return fail("`>` may only be the last token");
        }
    }
    Ok(())
}

/// The pattern matching exactly the subjects both `a` and `b` match, if any.
pub fn intersection(a: &str, b: &str) -> Option<String> {
    let a: Vec<&str> = a.split('.').collect();
    let b: Vec<&str> = b.split('.').collect();
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        match (a.get(i), b.get(i)) {
            (None, None) => return Some(out.join(".")),
            // `>` needs at least one token, so it meets nothing once the other side has ended.
            (Some(&">"), Some(_)) => {
                out.extend_from_slice(&b[i..]);
                return Some(out.join("."));
            }
            (Some(_), Some(&">")) => {
                out.extend_from_slice(&a[i..]);
                return Some(out.join("."));
            }
            (Some(&"*"), Some(other)) | (Some(other), Some(&"*")) => out.push(*other),
            (Some(x), Some(y)) if x == y => out.push(*x),
            _ => return None,
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_intersection_is_exactly_the_common_subjects() {
        let cases = [
            ("herald.>", "herald.events.>", Some("herald.events.>")),
            ("herald.events.>", "herald.>", Some("herald.events.>")),
            (
                "herald.*.Order.>",
                "herald.events.>",
                Some("herald.events.Order.>"),
            ),
            (
                "herald.events.Order.insert",
                "herald.events.>",
                Some("herald.events.Order.insert"),
            ),
            (
                "herald.events.*",
                "herald.events.>",
                Some("herald.events.*"),
            ),
            (
                "herald.jobs.*.default",
                "herald.jobs.submit.>",
                Some("herald.jobs.submit.default"),
            ),
            ("herald.*.*", "herald.actions.>", Some("herald.actions.*")),
            ("herald.events.>", "herald.actions.>", None),
            ("herald.events", "herald.events.>", None),
            ("herald.control.jobs.>", "herald.jobs.submit.>", None),
            (">", "herald.dlq.>", Some("herald.dlq.>")),
        ];
        for (a, b, expected) in cases {
            assert_eq!(intersection(a, b).as_deref(), expected, "{a} ∩ {b}");
        }
    }

    #[test]
    fn malformed_filters_are_refused() {
        for bad in [
            "",
            "herald..events",
            "herald.>.x",
            "herald.ev*",
            "a b",
            "herald.events.",
        ] {
            assert!(validate(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "herald.>",
            "herald.*.Order.insert",
            ">",
            "herald.events.Order.insert",
        ] {
            assert_eq!(validate(good), Ok(()), "{good:?} refused");
        }
    }
}
