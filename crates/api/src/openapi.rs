//! The OpenAPI (Swagger 2.0) document of what Vessel serves (`crates/api/openapi.json`), and a
//! small validator for the JSON-schema subset it uses (`$ref`, `type`, `properties`,
//! `required`, `additionalProperties`, `items`, `enum`, `minimum`, `maximum`), so tests can
//! check real requests and responses against it.

use serde_json::Value;

/// The document, as committed.
pub const DOCUMENT: &str = include_str!("../openapi.json");

/// Why a value, request or response does not match the document.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchemaError {
    /// The operation is not in the document.
    #[error("{method} {path} is not documented")]
    NotDocumented {
        /// Lower-case method.
        method: String,
        /// Path pattern.
        path: String,
    },
    /// The operation does not document this response status.
    #[error("{method} {path}: status {status} is not documented")]
    StatusNotDocumented {
        /// Lower-case method.
        method: String,
        /// Path pattern.
        path: String,
        /// Response status.
        status: u16,
    },
    /// A `$ref` outside `#/definitions/`.
    #[error("unsupported $ref {0}")]
    UnsupportedRef(String),
    /// A `$ref` to a definition the document lacks.
    #[error("unknown definition {0}")]
    UnknownDefinition(String),
    /// A schema `type` the validator does not know.
    #[error("{at}: unsupported schema type {ty}")]
    UnsupportedType {
        /// Location in the value (`$.drives[0]`).
        at: String,
        /// The schema's type.
        ty: String,
    },
    /// The value has another JSON type.
    #[error("{at}: expected {expected}, got {got}")]
    WrongType {
        /// Location in the value.
        at: String,
        /// The schema's type.
        expected: String,
        /// The value found.
        got: Value,
    },
    /// The value is not among the schema's `enum`.
    #[error("{at}: {value} is not one of {allowed:?}")]
    NotInEnum {
        /// Location in the value.
        at: String,
        /// The value found.
        value: Value,
        /// The values allowed.
        allowed: Vec<Value>,
    },
    /// The number is below the schema's `minimum`.
    #[error("{at}: {n} < minimum {min}")]
    BelowMinimum {
        /// Location in the value.
        at: String,
        /// The number found.
        n: f64,
        /// The minimum.
        min: f64,
    },
    /// The number is above the schema's `maximum`.
    #[error("{at}: {n} > maximum {max}")]
    AboveMaximum {
        /// Location in the value.
        at: String,
        /// The number found.
        n: f64,
        /// The maximum.
        max: f64,
    },
    /// A required property is missing.
    #[error("{at}: missing required property {name}")]
    MissingProperty {
        /// Location of the object.
        at: String,
        /// The property.
        name: String,
    },
    /// A property the schema does not allow.
    #[error("{at}: unknown property {name}")]
    UnknownProperty {
        /// Location of the object.
        at: String,
        /// The property.
        name: String,
    },
}

/// The parsed document (`Null` if it does not parse, which a test catches).
pub fn document() -> &'static Value {
    static DOC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    DOC.get_or_init(|| serde_json::from_str(DOCUMENT).unwrap_or(Value::Null))
}

/// The operation object for `method` (lower-case) on `path`.
pub fn operation(path: &str, method: &str) -> Option<&'static Value> {
    document().get("paths")?.get(path)?.get(method)
}

/// The schema of an operation's body parameter.
pub fn request_schema(path: &str, method: &str) -> Option<&'static Value> {
    operation(path, method)?
        .get("parameters")?
        .as_array()?
        .iter()
        .find(|p| p.get("in").and_then(Value::as_str) == Some("body"))?
        .get("schema")
}

/// The schema of an operation's response with `status` (falling back to `default`).
/// `Ok(None)`: the status is documented without a body.
pub fn response_schema(
    path: &str,
    method: &str,
    status: u16,
) -> Result<Option<&'static Value>, SchemaError> {
    let responses = operation(path, method)
        .and_then(|o| o.get("responses"))
        .ok_or_else(|| SchemaError::NotDocumented {
            method: method.to_string(),
            path: path.to_string(),
        })?;
    let r = responses
        .get(status.to_string())
        .or_else(|| {
            if status >= 400 {
                responses.get("default")
            } else {
                None
            }
        })
        .ok_or_else(|| SchemaError::StatusNotDocumented {
            method: method.to_string(),
            path: path.to_string(),
            status,
        })?;
    Ok(r.get("schema"))
}

fn resolve(schema: &Value) -> Result<&Value, SchemaError> {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r
                .strip_prefix("#/definitions/")
                .ok_or_else(|| SchemaError::UnsupportedRef(r.to_string()))?;
            document()
                .get("definitions")
                .and_then(|d| d.get(name))
                .ok_or_else(|| SchemaError::UnknownDefinition(name.to_string()))
        }
        None => Ok(schema),
    }
}

/// The `$ref` target name of a schema, if it is a reference.
pub fn ref_name(schema: &Value) -> Option<&str> {
    schema.get("$ref")?.as_str()?.strip_prefix("#/definitions/")
}

/// Checks `value` against `schema`; the error names the offending location.
pub fn validate(schema: &Value, value: &Value) -> Result<(), SchemaError> {
    validate_at(schema, value, "$")
}

fn validate_at(schema: &Value, value: &Value, at: &str) -> Result<(), SchemaError> {
    let schema = resolve(schema)?;
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            other => {
                return Err(SchemaError::UnsupportedType {
                    at: at.to_string(),
                    ty: other.to_string(),
                })
            }
        };
        if !ok {
            return Err(SchemaError::WrongType {
                at: at.to_string(),
                expected: t.to_string(),
                got: value.clone(),
            });
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            return Err(SchemaError::NotInEnum {
                at: at.to_string(),
                value: value.clone(),
                allowed: allowed.clone(),
            });
        }
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
            if n < min {
                return Err(SchemaError::BelowMinimum {
                    at: at.to_string(),
                    n,
                    min,
                });
            }
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
            if n > max {
                return Err(SchemaError::AboveMaximum {
                    at: at.to_string(),
                    n,
                    max,
                });
            }
        }
    }
    if let Some(items) = schema.get("items") {
        for (i, v) in value.as_array().into_iter().flatten().enumerate() {
            validate_at(items, v, &format!("{at}[{i}]"))?;
        }
    }
    if let Some(obj) = value.as_object() {
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = r.as_str().unwrap_or("");
            if !obj.contains_key(name) {
                return Err(SchemaError::MissingProperty {
                    at: at.to_string(),
                    name: name.to_string(),
                });
            }
        }
        let props = schema.get("properties").and_then(Value::as_object);
        let required = |k: &str| {
            schema
                .get("required")
                .and_then(Value::as_array)
                .is_some_and(|r| r.iter().any(|n| n.as_str() == Some(k)))
        };
        for (k, v) in obj {
            // An optional property may be null: Firecracker writes unset fields so (its
            // Swagger 2.0 document cannot say it).
            if v.is_null() && !required(k) {
                continue;
            }
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate_at(s, v, &format!("{at}.{k}"))?,
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        return Err(SchemaError::UnknownProperty {
                            at: at.to_string(),
                            name: k.clone(),
                        })
                    }
                    Some(s @ Value::Object(_)) => validate_at(s, v, &format!("{at}.{k}"))?,
                    _ => {}
                },
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validator_catches_what_it_claims_to() {
        let drive = json!({"$ref": "#/definitions/Drive"});
        assert!(validate(&drive, &json!({"drive_id": "a", "is_root_device": true})).is_ok());
        assert!(validate(&drive, &json!({"drive_id": "a"})).is_err());
        assert!(validate(&drive, &json!({"drive_id": 1, "is_root_device": true})).is_err());
        assert!(validate(
            &drive,
            &json!({"drive_id": "a", "is_root_device": true, "x": 1})
        )
        .is_err());
        assert!(validate(
            &drive,
            &json!({"drive_id": "a", "is_root_device": true, "io_engine": "Fast"})
        )
        .is_err());
        let mc = json!({"$ref": "#/definitions/MachineConfiguration"});
        assert!(validate(&mc, &json!({"vcpu_count": 33, "mem_size_mib": 1})).is_err());
        assert!(validate(&json!({"$ref": "#/definitions/Nope"}), &json!({})).is_err());
        let cfg = json!({"$ref": "#/definitions/FullVmConfiguration"});
        assert!(validate(&cfg, &json!({"drives": [{"drive_id": 3}]})).is_err());
        // A pmem device's rate limiter may be null (unset), not another type.
        let pmem = json!({"id": "p", "path_on_host": "/f", "rate_limiter": null});
        assert!(validate(&cfg, &json!({"pmem": [pmem]})).is_ok());
        let pmem = json!({"id": "p", "path_on_host": "/f", "rate_limiter": 3});
        assert!(validate(&cfg, &json!({"pmem": [pmem]})).is_err());
    }

    #[test]
    fn schema_errors_name_the_place() {
        let drive = json!({"$ref": "#/definitions/Drive"});
        let e = validate(&drive, &json!({"drive_id": "a"})).unwrap_err();
        assert_eq!(e.to_string(), "$: missing required property is_root_device");
        let e = validate(&drive, &json!({"drive_id": 1, "is_root_device": true})).unwrap_err();
        assert_eq!(e.to_string(), "$.drive_id: expected string, got 1");
        assert_eq!(
            response_schema("/nope", "get", 200).unwrap_err(),
            SchemaError::NotDocumented {
                method: "get".into(),
                path: "/nope".into()
            }
        );
    }

    #[test]
    fn the_served_api_version_is_the_document_s() {
        assert_eq!(
            document()["info"]["version"].as_str(),
            Some(crate::FIRECRACKER_API_VERSION)
        );
    }
}
