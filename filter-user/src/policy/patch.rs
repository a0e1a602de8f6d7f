//! PATCH semantics (docs/REFERENCE.md "Control-plane API"): the ops, and applying them to a
//! policy all-or-nothing with errors placed at the op that brought them.

use super::*;

/// `{"revision": N, "ops": [...]}`, applied all-or-nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Patch {
    pub revision: u64,
    pub ops: Vec<PatchOp>,
}

impl Patch {
    pub fn from_json_str(s: &str) -> Result<Patch, Vec<PolicyError>> {
        parse_json(s)
    }
}

/// A PATCH as the API receives it. `revision` may be left out: the write is then
/// unconditional and applied at the applied revision + 1 (ops that already hold answer
/// "unchanged"), so a client need not read the policy to learn the revision first.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchRequest {
    #[serde(default)]
    pub revision: Option<u64>,
    pub ops: Vec<PatchOp>,
}

impl PatchRequest {
    pub fn from_json_str(s: &str) -> Result<PatchRequest, Vec<PolicyError>> {
        parse_json(s)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum PatchOp {
    /// Replaces the key with the same prefix, or appends it.
    Upsert {
        key: Key,
    },
    Delete {
        prefix: String,
    },
    /// Locks the key; `lock_reason` and `locked_until` replace the key's (absent: none).
    Lock {
        prefix: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lock_reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        locked_until: Option<String>,
    },
    Unlock {
        prefix: String,
    },
    /// Creates or replaces an ipset.
    SetIpset {
        name: String,
        cidrs: Vec<String>,
    },
    DeleteIpset {
        name: String,
    },
}

impl Policy {
    /// Applies `patch` to a copy of this policy and validates the result; `self` is never
    /// changed. The result carries `patch.revision`. Errors in what an op brought in are
    /// placed at that op (`ops[2].key.allow[0]`), the rest as in a policy file.
    pub fn apply_patch(&self, patch: &Patch) -> Result<Policy, Vec<PolicyError>> {
        let mut next = self.clone();
        next.revision = Some(patch.revision);
        let mut errs = Vec::new();
        // Which op last wrote each key (parallel to next.key) and each ipset.
        let mut key_origin: Vec<Option<usize>> = vec![None; next.key.len()];
        let mut ipset_origin: BTreeMap<String, usize> = BTreeMap::new();
        let mut deleted_ipsets: Vec<(usize, &str)> = Vec::new();

        for (n, op) in patch.ops.iter().enumerate() {
            let missing_key = |prefix: &str| {
                PolicyError::new(
                    format!("ops[{n}].prefix"),
                    format!("no key with prefix {prefix:?}"),
                )
            };
            match op {
                PatchOp::Upsert { key } => match next.key_index(&key.prefix) {
                    Some(j) => {
                        next.key[j] = key.clone();
                        key_origin[j] = Some(n);
                    }
                    None => {
                        next.key.push(key.clone());
                        key_origin.push(Some(n));
                    }
                },
                PatchOp::Delete { prefix } => match next.key_index(prefix) {
                    Some(j) => {
                        next.key.remove(j);
                        key_origin.remove(j);
                    }
                    None => errs.push(missing_key(prefix)),
                },
                PatchOp::Lock { prefix, .. } | PatchOp::Unlock { prefix } => {
                    match next.key_index(prefix) {
                        Some(j) => {
                            let (_, lock, reason, until) = op.lock_args().expect("a lock op");
                            let mut k = next.key[j].clone();
                            k.set_lock(lock, reason, until);
                            // Errors in what the op brought are placed at the op; the key
                            // then stays as it was, so they are not reported twice.
                            let n0 = errs.len();
                            check_lock_fields(&k, &format!("ops[{n}]"), &mut errs);
                            if errs.len() == n0 {
                                next.key[j] = k;
                            }
                        }
                        None => errs.push(missing_key(prefix)),
                    }
                }
                PatchOp::SetIpset { name, cidrs } => {
                    next.ipsets.insert(name.clone(), cidrs.clone());
                    ipset_origin.insert(name.clone(), n);
                }
                PatchOp::DeleteIpset { name } => {
                    if next.ipsets.remove(name).is_some() {
                        ipset_origin.remove(name);
                        deleted_ipsets.push((n, name));
                    } else {
                        errs.push(PolicyError::new(
                            format!("ops[{n}].name"),
                            format!("no ipset {name:?}"),
                        ));
                    }
                }
            }
        }

        // Deleting an ipset that keys still use is the delete's fault, not the keys'. Stand
        // an empty set in for it so validation does not report the same thing again.
        let mut checked = None;
        for &(n, name) in &deleted_ipsets {
            if next.ipsets.contains_key(name) {
                continue; // set again by a later op
            }
            let users: Vec<&str> = next
                .key
                .iter()
                .filter(|k| k.ipsets.iter().any(|s| s == name))
                .map(|k| k.prefix.as_str())
                .collect();
            if users.is_empty() {
                continue;
            }
            let mut list = users
                .iter()
                .take(3)
                .map(|p| format!("{p:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            if users.len() > 3 {
                list.push_str(&format!(" and {} more", users.len() - 3));
            }
            errs.push(PolicyError::new(
                format!("ops[{n}].name"),
                format!("ipset {name:?} is still used by key {list}"),
            ));
            checked
                .get_or_insert_with(|| next.clone())
                .ipsets
                .insert(name.to_owned(), Vec::new());
        }

        if let Err(found) = checked.as_ref().unwrap_or(&next).validate() {
            errs.extend(found.into_iter().map(|e| PolicyError {
                at: op_place(&e.at, &key_origin, &ipset_origin),
                message: e.message,
            }));
        }
        if errs.is_empty() { Ok(next) } else { Err(errs) }
    }
}

/// Moves a policy place into the op that wrote it: `key[5].allow[0]` to `ops[2].key.allow[0]`,
/// `ipsets.x[1]` to `ops[3].cidrs[1]`. Places in what no op touched stay as they are.
fn op_place(
    at: &str,
    key_origin: &[Option<usize>],
    ipset_origin: &BTreeMap<String, usize>,
) -> String {
    if let Some(rest) = at.strip_prefix("key[")
        && let Some((idx, tail)) = rest.split_once(']')
        && let Ok(j) = idx.parse::<usize>()
        && let Some(Some(n)) = key_origin.get(j)
    {
        return format!("ops[{n}].key{tail}");
    }
    if let Some(rest) = at.strip_prefix("ipsets.") {
        for (name, n) in ipset_origin {
            if rest == name {
                return format!("ops[{n}]");
            }
            if let Some(tail) = rest.strip_prefix(name.as_str())
                && tail.starts_with('[')
            {
                return format!("ops[{n}].cidrs{tail}");
            }
        }
    }
    at.to_owned()
}

impl PatchOp {
    /// A lock or unlock op as `Key::set_lock` arguments: (lock, reason, until).
    pub fn lock_args(&self) -> Option<(&str, bool, Option<&str>, Option<&str>)> {
        match self {
            PatchOp::Lock {
                prefix,
                lock_reason,
                locked_until,
            } => Some((
                prefix,
                true,
                lock_reason.as_deref(),
                locked_until.as_deref(),
            )),
            PatchOp::Unlock { prefix } => Some((prefix, false, None, None)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::{example, key};

    #[test]
    fn patch_parses_from_json() {
        let patch = Patch::from_json_str(
            r#"{"revision": 8, "ops": [
                {"op": "upsert", "key": {"prefix": "0123abcd", "allow": ["192.0.2.1"]}},
                {"op": "delete", "prefix": "37c541a1"},
                {"op": "lock", "prefix": "x"},
                {"op": "unlock", "prefix": "x"},
                {"op": "set_ipset", "name": "b", "cidrs": ["192.0.2.0/24"]},
                {"op": "delete_ipset", "name": "b"}]}"#,
        )
        .unwrap();
        assert_eq!(patch.revision, 8);
        assert_eq!(
            patch.ops[1],
            PatchOp::Delete {
                prefix: "37c541a1".into()
            }
        );
        assert_eq!(
            patch.ops[4],
            PatchOp::SetIpset {
                name: "b".into(),
                cidrs: vec!["192.0.2.0/24".into()]
            }
        );
        let json = serde_json::to_string(&patch).unwrap();
        assert_eq!(Patch::from_json_str(&json).unwrap(), patch);

        let e = Patch::from_json_str(
            r#"{"revision": 8, "ops": [
                {"op": "lock", "prefix": "x"},
                {"op": "upsert", "key": {"prefix": "0123abcd", "allow": [1]}},
                {"op": "frobnicate"},
                {"op": "delete"},
                {"op": "delete", "prefix": "x", "extra": 1}]}"#,
        )
        .unwrap_err();
        let at: Vec<&str> = e.iter().map(|e| e.at.as_str()).collect();
        assert_eq!(
            at,
            ["ops[1].key.allow[0]", "ops[2].op", "ops[3]", "ops[4].extra"],
            "{e:?}"
        );
        assert_eq!(e[2].message, "missing field `prefix`");

        // Missing fields are reported by the object that lacks them, at every depth.
        let e = Patch::from_json_str(
            r#"{"ops": [{"op": "upsert", "key": {"allow": []}}, {"op": "set_ipset", "name": "a"}]}"#,
        )
        .unwrap_err();
        let shown: Vec<String> = e.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "ops[0].key: missing field `prefix`",
                "ops[1]: missing field `cidrs`",
                "missing field `revision`",
            ]
        );
    }

    #[test]
    fn patch_applies_ops_in_order() {
        let p = example();
        let patch = Patch {
            revision: 8,
            ops: vec![
                PatchOp::Upsert {
                    key: key("0123abcd", &["192.0.2.1"], &[]),
                },
                PatchOp::Lock {
                    prefix: "0123abcd".into(),
                    lock_reason: None,
                    locked_until: None,
                },
                PatchOp::Upsert {
                    key: key("37c541a1", &["198.51.100.8"], &["tools"]),
                },
                PatchOp::SetIpset {
                    name: "tools".into(),
                    cidrs: vec!["192.0.2.128/25".into()],
                },
                PatchOp::Unlock {
                    prefix: "37c541a1".into(),
                },
                PatchOp::DeleteIpset {
                    name: "broker-a".into(),
                },
            ],
        };
        let next = p.apply_patch(&patch).unwrap();
        assert_eq!(next.revision, Some(8));
        assert_eq!(next.key.len(), 2);
        assert_eq!(next.key[0], key("37c541a1", &["198.51.100.8"], &["tools"]));
        assert!(next.key[1].locked);
        assert_eq!(next.ipsets.keys().collect::<Vec<_>>(), ["tools"]);
        // The original is untouched.
        assert_eq!(p, example());

        let next = next
            .apply_patch(&Patch {
                revision: 9,
                ops: vec![PatchOp::Delete {
                    prefix: "0123abcd".into(),
                }],
            })
            .unwrap();
        assert_eq!(next.key.len(), 1);
    }

    #[test]
    fn lock_ops_carry_reason_and_expiry() {
        let p = example();
        let req = PatchRequest::from_json_str(
            r#"{"ops":[{"op":"lock","prefix":"37c541a1","lock_reason":"shared","locked_until":"2026-12-01T08:00:00Z"}]}"#,
        )
        .unwrap();
        let next = p
            .apply_patch(&Patch {
                revision: 8,
                ops: req.ops.clone(),
            })
            .unwrap();
        let k = next.find_key("37c541a1").unwrap();
        assert!(k.locked);
        assert_eq!(k.lock_reason.as_deref(), Some("shared"));
        assert_eq!(k.locked_until.as_deref(), Some("2026-12-01T08:00:00Z"));
        assert!(k.lock_is(true, Some("shared"), Some("2026-12-01T08:00:00Z")));
        // A plain lock replaces both; an unlock clears them.
        let mut k2 = k.clone();
        k2.set_lock(true, None, None);
        assert_eq!((k2.lock_reason, k2.locked_until), (None, None));
        let unlocked = next
            .apply_patch(&Patch {
                revision: 9,
                ops: vec![PatchOp::Unlock {
                    prefix: "37c541a1".into(),
                }],
            })
            .unwrap();
        let k = unlocked.find_key("37c541a1").unwrap();
        assert!(!k.locked && k.lock_reason.is_none() && k.locked_until.is_none());
        // Bad fields are the op's, at the op.
        let errs = p
            .apply_patch(&Patch {
                revision: 8,
                ops: vec![PatchOp::Lock {
                    prefix: "37c541a1".into(),
                    lock_reason: None,
                    locked_until: Some("2026-02-30T00:00:00Z".into()),
                }],
            })
            .unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].at, "ops[0].locked_until");
    }

    #[test]
    fn patch_is_all_or_nothing_and_places_errors_at_ops() {
        let p = example();
        let patch = Patch {
            revision: 8,
            ops: vec![
                PatchOp::Upsert {
                    key: key("0123abcd", &["192.0.2.1"], &[]),
                },
                PatchOp::Delete {
                    prefix: "nope0000".into(),
                },
                PatchOp::Upsert {
                    key: key("37c541a1", &["10.0.0.1/8"], &["ghost"]),
                },
                PatchOp::Lock {
                    prefix: "nope0001".into(),
                    lock_reason: None,
                    locked_until: None,
                },
                PatchOp::SetIpset {
                    name: "tools".into(),
                    cidrs: vec!["1.2.3.4".into(), "1.2.3.4/16".into()],
                },
                PatchOp::DeleteIpset {
                    name: "nope".into(),
                },
                PatchOp::Upsert {
                    key: key("short", &[], &[]),
                },
            ],
        };
        let e: Vec<String> = p
            .apply_patch(&patch)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            e,
            [
                r#"ops[1].prefix: no key with prefix "nope0000""#,
                r#"ops[3].prefix: no key with prefix "nope0001""#,
                r#"ops[5].name: no ipset "nope""#,
                "ops[4].cidrs[1]: host bits set in 1.2.3.4/16",
                "ops[2].key.allow[0]: host bits set in 10.0.0.1/8",
                r#"ops[2].key.ipsets[0]: unknown ipset "ghost""#,
                r#"ops[6].key.prefix: must be exactly 8 bytes (settings.key_prefix_len), got 5 in "short""#,
            ]
        );
        assert_eq!(p, example());
    }

    #[test]
    fn patch_refuses_to_delete_an_ipset_in_use() {
        let p = example();
        let delete = PatchOp::DeleteIpset {
            name: "broker-a".into(),
        };
        let e = p
            .apply_patch(&Patch {
                revision: 8,
                ops: vec![delete.clone()],
            })
            .unwrap_err();
        assert_eq!(
            e,
            [PolicyError::new(
                "ops[0].name",
                r#"ipset "broker-a" is still used by key "37c541a1""#
            )]
        );
        // Fine once the key lets go of it, or when the set comes back later in the same patch.
        let release = PatchOp::Upsert {
            key: key("37c541a1", &["198.51.100.7"], &[]),
        };
        assert!(
            p.apply_patch(&Patch {
                revision: 8,
                ops: vec![delete.clone(), release]
            })
            .is_ok()
        );
        let again = PatchOp::SetIpset {
            name: "broker-a".into(),
            cidrs: vec![],
        };
        assert!(
            p.apply_patch(&Patch {
                revision: 8,
                ops: vec![delete, again]
            })
            .is_ok()
        );
    }
}
