//! The JSON Schemas of `contracts/schemas/`, loaded as a client would load the directory (every
//! file registered under its `$id`, so relative `$ref`s resolve offline), for tests that check
//! real answers (the auditor's search API, Flight tickets) against the published contract.

use std::collections::BTreeMap;

use jsonschema::{Registry, Validator};
use serde_json::Value;

use crate::workspace_root;

pub struct Schemas {
    schemas: BTreeMap<String, Value>,
    registry: Registry<'static>,
}

impl Schemas {
    pub fn load() -> Self {
        let dir = workspace_root().join("contracts/schemas");
        let mut schemas = BTreeMap::new();
        for entry in
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        {
            let path = entry.expect("a schema file").path();
            let Some(name) = path
                .file_name()
                .and_then(|f| f.to_str())
                .and_then(|f| f.strip_suffix(".schema.json"))
                .map(str::to_owned)
            else {
                continue;
            };
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            let schema: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            schemas.insert(name, schema);
        }
        let resources: Vec<(String, Value)> = schemas
            .iter()
            .map(|(name, schema)| {
                let id = schema["$id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("schema {name} has no $id"))
                    .to_owned();
                (id, schema.clone())
            })
            .collect();
        let registry = Registry::new()
            .extend(resources)
            .expect("schema $ids are valid URIs")
            .prepare()
            .expect("the schemas form a consistent registry");
        Self { schemas, registry }
    }

    pub fn schema(&self, name: &str) -> &Value {
        self.schemas
            .get(name)
            .unwrap_or_else(|| panic!("contracts/schemas/{name}.schema.json is missing"))
    }

    fn validator(&self, schema: &Value) -> Validator {
        jsonschema::options()
            .with_registry(&self.registry)
            .should_validate_formats(true)
            .offline()
            .build(schema)
            .unwrap_or_else(|e| panic!("schema does not compile: {e}"))
    }

    /// Where `instance` breaks schema `name` (empty: it validates).
    pub fn problems(&self, name: &str, instance: &Value) -> Vec<String> {
        self.validator(self.schema(name))
            .iter_errors(instance)
            .map(|e| format!("  at `{}`: {e}", e.instance_path()))
            .collect()
    }

    pub fn assert_valid(&self, name: &str, instance: &Value, what: &str) {
        let problems = self.problems(name, instance);
        assert!(
            problems.is_empty(),
            "{what} does not validate against {name}.schema.json:\n{}\ninstance: {instance:#}",
            problems.join("\n")
        );
    }

    pub fn assert_invalid(&self, name: &str, instance: &Value, what: &str) {
        assert!(
            !self.problems(name, instance).is_empty(),
            "{what} validates against {name}.schema.json but must not: {instance:#}"
        );
    }
}
