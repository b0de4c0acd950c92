//! JSON path helpers for event payloads.
//!
//! A path is a dotted list of segments, e.g. `data.user.email`:
//! - a segment names an object key, or an array index (`items.0.id`);
//! - `*` matches every key of an object or every element of an array
//!   (`data.items.*.card`).
//!
//! Paths cross **embedded JSON strings**: Pusher events usually carry `data` as
//! a string containing JSON. When a path goes through a string value that
//! parses as a JSON object or array, the helpers descend into it; the mutating
//! ones re-serialize it as a (compact) string afterwards, so the payload keeps
//! its shape.
//!
//! Keys containing dots cannot be addressed.

use serde_json::Value;

/// Splits a path into segments; empty segments are ignored (`"a..b"` = `"a.b"`).
fn segments(path: &str) -> Vec<&str> {
    path.split('.')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// If `value` is a string holding a JSON object or array, the parsed value.
fn embedded(value: &str) -> Option<Value> {
    let trimmed = value.trim_start();
    if !(trimmed.starts_with('{') || trimmed.starts_with('[')) {
        return None;
    }
    serde_json::from_str::<Value>(value)
        .ok()
        .filter(|v| v.is_object() || v.is_array())
}

/// `value` with an embedded JSON string (object or array) decoded; anything
/// else is returned unchanged.
pub fn decode_embedded(value: Value) -> Value {
    match &value {
        Value::String(s) => embedded(s).unwrap_or(value),
        _ => value,
    }
}

/// Every value at `path` (several with `*`), crossing embedded JSON strings.
/// An empty path yields the root itself.
pub fn get_all(root: &Value, path: &str) -> Vec<Value> {
    let mut out = Vec::new();
    collect(root, &segments(path), &mut out);
    out
}

/// The first value at `path`, crossing embedded JSON strings.
pub fn get(root: &Value, path: &str) -> Option<Value> {
    get_all(root, path).into_iter().next()
}

fn collect(node: &Value, segs: &[&str], out: &mut Vec<Value>) {
    let Some((first, rest)) = segs.split_first() else {
        out.push(node.clone());
        return;
    };
    match node {
        Value::Object(map) => {
            if *first == "*" {
                for child in map.values() {
                    collect(child, rest, out);
                }
            } else if let Some(child) = map.get(*first) {
                collect(child, rest, out);
            }
        }
        Value::Array(items) => {
            if *first == "*" {
                for child in items {
                    collect(child, rest, out);
                }
            } else if let Some(child) = first.parse::<usize>().ok().and_then(|i| items.get(i)) {
                collect(child, rest, out);
            }
        }
        Value::String(s) => {
            if let Some(inner) = embedded(s) {
                collect(&inner, segs, out);
            }
        }
        _ => {}
    }
}

/// A value as text for comparisons: strings as they are, anything else as
/// compact JSON (`42`, `true`, `null`, `{"a":1}`).
pub fn as_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => compact(other),
    }
}

/// A value as compact JSON text. Faster than `to_string()` (which goes
/// through `fmt`): serde_json writes straight into the buffer.
pub fn compact(value: &Value) -> String {
    serde_json::to_string(value).expect("a JSON value always serializes")
}

/// Replaces every value at `path` with `replacement`; returns how many were
/// replaced. Missing paths are ignored.
pub fn replace(root: &mut Value, path: &str, replacement: &Value) -> usize {
    let segs = segments(path);
    if segs.is_empty() {
        return 0;
    }
    apply(root, &segs, &Action::Replace(replacement))
}

/// Removes every value at `path` (object keys, array elements); returns how
/// many were removed. Missing paths are ignored.
pub fn remove(root: &mut Value, path: &str) -> usize {
    let segs = segments(path);
    if segs.is_empty() {
        return 0;
    }
    apply(root, &segs, &Action::Remove)
}

/// Sets `path` to `value`, creating intermediate objects where keys are
/// missing (crossing embedded JSON strings and array indexes that exist).
/// Returns `false` if the path runs into a non-container value.
pub fn set(root: &mut Value, path: &str, value: Value) -> bool {
    let segs = segments(path);
    if segs.is_empty() || segs.contains(&"*") {
        return false;
    }
    set_at(root, &segs, value)
}

fn set_at(node: &mut Value, segs: &[&str], value: Value) -> bool {
    let (first, rest) = segs.split_first().expect("non-empty path");
    match node {
        Value::Object(map) => {
            if rest.is_empty() {
                map.insert((*first).to_owned(), value);
                return true;
            }
            let child = map
                .entry((*first).to_owned())
                .or_insert_with(|| Value::Object(Default::default()));
            set_at(child, rest, value)
        }
        Value::Array(items) => {
            let Some(child) = first.parse::<usize>().ok().and_then(|i| items.get_mut(i)) else {
                return false;
            };
            if rest.is_empty() {
                *child = value;
                true
            } else {
                set_at(child, rest, value)
            }
        }
        Value::String(s) => match embedded(s) {
            Some(mut inner) => {
                let done = set_at(&mut inner, segs, value);
                if done {
                    *s = compact(&inner);
                }
                done
            }
            None => false,
        },
        _ => false,
    }
}

enum Action<'a> {
    Replace(&'a Value),
    Remove,
}

fn apply(node: &mut Value, segs: &[&str], action: &Action<'_>) -> usize {
    let (first, rest) = segs.split_first().expect("non-empty path");
    match node {
        Value::Object(map) => {
            if rest.is_empty() {
                match action {
                    Action::Replace(replacement) => {
                        let mut n = 0;
                        for (key, child) in map.iter_mut() {
                            if *first == "*" || key.as_str() == *first {
                                *child = (*replacement).clone();
                                n += 1;
                            }
                        }
                        n
                    }
                    Action::Remove => {
                        if *first == "*" {
                            let n = map.len();
                            map.clear();
                            n
                        } else {
                            usize::from(map.shift_remove(*first).is_some())
                        }
                    }
                }
            } else if *first == "*" {
                map.values_mut()
                    .map(|child| apply(child, rest, action))
                    .sum()
            } else {
                map.get_mut(*first)
                    .map_or(0, |child| apply(child, rest, action))
            }
        }
        Value::Array(items) => {
            let index = first.parse::<usize>().ok();
            if rest.is_empty() {
                match (action, *first == "*", index) {
                    (Action::Replace(replacement), true, _) => {
                        items.iter_mut().for_each(|c| *c = (*replacement).clone());
                        items.len()
                    }
                    (Action::Remove, true, _) => {
                        let n = items.len();
                        items.clear();
                        n
                    }
                    (Action::Replace(replacement), false, Some(i)) if i < items.len() => {
                        items[i] = (*replacement).clone();
                        1
                    }
                    (Action::Remove, false, Some(i)) if i < items.len() => {
                        items.remove(i);
                        1
                    }
                    _ => 0,
                }
            } else if *first == "*" {
                items
                    .iter_mut()
                    .map(|child| apply(child, rest, action))
                    .sum()
            } else {
                index
                    .and_then(|i| items.get_mut(i))
                    .map_or(0, |child| apply(child, rest, action))
            }
        }
        Value::String(s) => match embedded(s) {
            Some(mut inner) => {
                let n = apply(&mut inner, segs, action);
                if n > 0 {
                    *s = compact(&inner);
                }
                n
            }
            None => 0,
        },
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pusher() -> Value {
        json!({
            "name": "client_event",
            "channel": "private-a",
            "data": "{\"email\":\"a@b.c\",\"card\":{\"number\":\"4111\",\"exp\":\"12/30\"},\"items\":[{\"ssn\":1},{\"ssn\":2}]}",
            "user": {"email": "x@y.z", "tags": ["a", "b"]}
        })
    }

    #[test]
    fn get_crosses_embedded_strings() {
        let v = pusher();
        assert_eq!(get(&v, "data.email"), Some(json!("a@b.c")));
        assert_eq!(get(&v, "data.card.number"), Some(json!("4111")));
        assert_eq!(get(&v, "user.tags.1"), Some(json!("b")));
        assert_eq!(get_all(&v, "data.items.*.ssn"), vec![json!(1), json!(2)]);
        assert_eq!(get(&v, "data.nope"), None);
        assert_eq!(get(&v, "name.x"), None);
        assert_eq!(get(&v, ""), Some(v.clone()));
    }

    #[test]
    fn replace_and_reserialize() {
        let mut v = pusher();
        let mask = json!("***");
        assert_eq!(replace(&mut v, "data.card.number", &mask), 1);
        assert_eq!(replace(&mut v, "user.email", &mask), 1);
        assert_eq!(replace(&mut v, "data.items.*.ssn", &mask), 2);
        assert_eq!(replace(&mut v, "missing.path", &mask), 0);
        // data is still a string, with the same key order
        let data = v["data"].as_str().unwrap();
        assert_eq!(
            data,
            r#"{"email":"a@b.c","card":{"number":"***","exp":"12/30"},"items":[{"ssn":"***"},{"ssn":"***"}]}"#
        );
        assert_eq!(v["user"]["email"], "***");
    }

    #[test]
    fn remove_keeps_order() {
        let mut v = pusher();
        assert_eq!(remove(&mut v, "data.email"), 1);
        assert_eq!(remove(&mut v, "user.tags.0"), 1);
        assert_eq!(remove(&mut v, "data.nothing"), 0);
        assert_eq!(
            v["data"].as_str().unwrap(),
            r#"{"card":{"number":"4111","exp":"12/30"},"items":[{"ssn":1},{"ssn":2}]}"#
        );
        assert_eq!(v["user"]["tags"], json!(["b"]));
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["name", "channel", "data", "user"]);
    }

    #[test]
    fn untouched_strings_are_not_reserialized() {
        let mut v = json!({"data": "{ \"a\" : 1 }"});
        assert_eq!(replace(&mut v, "data.b", &json!(0)), 0);
        assert_eq!(v["data"], "{ \"a\" : 1 }");
    }

    #[test]
    fn set_creates_objects() {
        let mut v = json!({"name": "x", "data": "{\"a\":1}"});
        assert!(set(&mut v, "meta.source", json!("wasm")));
        assert!(set(&mut v, "data.b", json!(2)));
        assert!(!set(&mut v, "name.deeper", json!(1)));
        assert_eq!(v["meta"], json!({"source": "wasm"}));
        assert_eq!(v["data"], r#"{"a":1,"b":2}"#);
    }

    #[test]
    fn text_and_decode() {
        assert_eq!(as_text(&json!("s")), "s");
        assert_eq!(as_text(&json!(4)), "4");
        assert_eq!(as_text(&json!(true)), "true");
        assert_eq!(decode_embedded(json!("{\"a\":1}")), json!({"a": 1}));
        assert_eq!(decode_embedded(json!("plain")), json!("plain"));
        assert_eq!(decode_embedded(json!("42")), json!("42"));
    }
}
