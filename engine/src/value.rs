//! Param values: YAML -> JSON conversion and the canonical form that keys hash.

use serde_json::{Map, Number, Value};

/// Converts a YAML value into JSON. Fails (with a path suffix and message) on NaN / inf,
/// non-string mapping keys, tagged values and text holding a NUL character, none of which a
/// param can hold (a NUL cannot pass into a path, an argument or an environment variable).
pub fn yaml_to_json(v: &serde_yaml::Value) -> Result<Value, (String, String)> {
    fn go(v: &serde_yaml::Value, path: &mut String) -> Result<Value, (String, String)> {
        use serde_yaml::Value as Y;
        Ok(match v {
            Y::Null => Value::Null,
            Y::Bool(b) => Value::Bool(*b),
            Y::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Value::from(i)
                } else if let Some(u) = n.as_u64() {
                    Value::from(u)
                } else {
                    let f = n.as_f64().unwrap_or(f64::NAN);
                    match Number::from_f64(f) {
                        Some(n) => Value::Number(n),
                        None => {
                            return Err((
                                path.clone(),
                                format!("expected a finite number, got {f}"),
                            ));
                        }
                    }
                }
            }
            Y::String(s) if s.contains('\0') => {
                return Err((
                    path.clone(),
                    format!("expected text without NUL characters, got {s:?}"),
                ));
            }
            Y::String(s) => Value::String(s.clone()),
            Y::Sequence(seq) => {
                let mut out = Vec::with_capacity(seq.len());
                for (i, item) in seq.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    out.push(go(item, path)?);
                    path.truncate(len);
                }
                Value::Array(out)
            }
            Y::Mapping(m) => {
                let mut out = Map::new();
                for (k, item) in m {
                    let key = match k {
                        Y::String(s) if s.contains('\0') => {
                            return Err((
                                path.clone(),
                                format!("expected keys without NUL characters, got {s:?}"),
                            ));
                        }
                        Y::String(s) => s.clone(),
                        Y::Number(n) => n.to_string(),
                        Y::Bool(b) => b.to_string(),
                        _ => {
                            return Err((path.clone(), "expected string keys in a mapping".into()));
                        }
                    };
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(&key);
                    out.insert(key, go(item, path)?);
                    path.truncate(len);
                }
                Value::Object(out)
            }
            Y::Tagged(t) => {
                return Err((path.clone(), format!("unexpected YAML tag {}", t.tag)));
            }
        })
    }
    go(v, &mut String::new())
}

/// Parses a command-line value as a YAML scalar (`3`, `0.1`, `true`, `cifar10`, `8/255`).
pub fn parse_scalar(text: &str) -> Result<Value, String> {
    let y: serde_yaml::Value = serde_yaml::from_str(text)
        .map_err(|e| format!("cannot parse `{text}` as a YAML value: {e}"))?;
    let y = if y.is_null() && !text.trim().is_empty() && text.trim() != "null" && text.trim() != "~"
    {
        serde_yaml::Value::String(text.to_string())
    } else {
        y
    };
    yaml_to_json(&y).map_err(|(_, m)| m)
}

/// The canonical form hashed into keys: object keys sorted (serde_json's default map is a
/// BTreeMap) and every float with an exact integer value written as that integer, so `1` and
/// `1.0` hash the same.
pub fn canonical(v: &Value) -> Value {
    match v {
        Value::Number(n) => {
            if n.is_f64()
                && let Some(f) = n.as_f64()
                && f.fract() == 0.0
                && f.abs() < 9.0e15
            {
                return Value::from(f as i64);
            }
            Value::Number(n.clone())
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), canonical(v))).collect())
        }
        other => other.clone(),
    }
}

/// Short human rendering of a value for node ids (`m=3`, `views=crop`, `eps=0.03`).
pub fn label(v: &Value) -> String {
    match canonical(v) {
        Value::String(s) => s,
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

/// Expands `${VAR}` and `${VAR:-default}` from the environment (`$$` is a literal `$`).
///
/// # Errors
/// An unset variable without a default, or an unclosed `${`.
pub fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in `{text}`"))?;
            let inner = &r[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            match (std::env::var(name).ok().filter(|v| !v.is_empty()), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable `{name}` is not set (write `${{{name}:-default}}` to give a default)"
                    ));
                }
            }
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integral_floats_become_integers() {
        assert_eq!(
            canonical(&serde_json::json!({"a": 1.0, "b": [2.5, 3.0]})),
            serde_json::json!({"a": 1, "b": [2.5, 3]})
        );
    }

    #[test]
    fn scalars_parse_as_yaml() {
        assert_eq!(parse_scalar("3").ok(), Some(serde_json::json!(3)));
        assert_eq!(parse_scalar("0.5").ok(), Some(serde_json::json!(0.5)));
        assert_eq!(parse_scalar("true").ok(), Some(serde_json::json!(true)));
        assert_eq!(parse_scalar("crop").ok(), Some(serde_json::json!("crop")));
        assert_eq!(parse_scalar("8/255").ok(), Some(serde_json::json!("8/255")));
        assert!(parse_scalar(".nan").is_err());
    }

    #[test]
    fn env_expansion() {
        let home = std::env::var("HOME").unwrap_or_default();
        assert_eq!(expand_env("${HOME}/x").ok(), Some(format!("{home}/x")));
        assert_eq!(
            expand_env("${PIPE_SURELY_UNSET_VAR:-data}/c").ok(),
            Some("data/c".into())
        );
        assert_eq!(expand_env("a$$b$c").ok(), Some("a$b$c".into()));
        assert!(
            expand_env("${PIPE_SURELY_UNSET_VAR}")
                .expect_err("unset")
                .contains("PIPE_SURELY_UNSET_VAR")
        );
        assert!(expand_env("${X").is_err());
    }

    #[test]
    fn nul_characters_are_rejected_with_their_path() {
        let y: serde_yaml::Value =
            serde_yaml::from_str("a: [ok, \"x\\0y\"]\nb: {\"k\\0\": 1}").expect("valid yaml");
        let map = y.as_mapping().expect("a mapping");
        let a = yaml_to_json(&map["a"]).expect_err("NUL in a value");
        assert_eq!(a.0, "[1]");
        assert!(a.1.contains("NUL"), "{}", a.1);
        let b = yaml_to_json(&map["b"]).expect_err("NUL in a key");
        assert!(b.1.contains("NUL"), "{}", b.1);
        assert!(parse_scalar("\"a\\0b\"").is_err());
    }

    #[test]
    fn nan_is_rejected_with_its_path() {
        let y: serde_yaml::Value = serde_yaml::from_str("a: {b: [1, .inf]}").expect("valid yaml");
        let err = yaml_to_json(&y).expect_err("inf must fail");
        assert_eq!(err.0, "a.b[1]");
    }
}
