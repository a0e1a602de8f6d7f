//! `keywall status` rendered for a terminal (the document is `status.rs`'s).

use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use crate::status::status_json;

/// `keywall status`: the status document, for people (or as JSON).
pub fn print(pin_dir: &Path, state_dir: &Path, json: bool) -> Result<()> {
    let v = status_json(pin_dir, state_dir, None)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let ifs: Vec<String> = v["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            format!(
                "{} ({})",
                i["name"].as_str().unwrap_or("?"),
                i["xdp_mode"].as_str().unwrap_or("?")
            )
        })
        .collect();
    println!(
        "attached:   {}",
        if ifs.is_empty() {
            "nothing".into()
        } else {
            ifs.join(", ")
        }
    );
    println!(
        "daemon:     {}",
        if v["daemon"]["running"].as_bool() == Some(true) {
            "running"
        } else {
            "not running (XDP keeps enforcing the last policy)"
        }
    );
    println!("mode:       {}", v["mode"].as_str().unwrap_or("?"));
    println!(
        "policy:     revision {} from {} (generation {})",
        v["revision"],
        v["source"].as_str().unwrap_or("-"),
        v["generation"]
    );
    println!(
        "keys:       {} ({} locked), {} listeners",
        v["keys"], v["locked_keys"], v["listeners"]
    );
    let reasons: Vec<String> = v["lock_reasons"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let why = r["reason"].as_str().unwrap_or("");
            format!(
                "{} {}",
                if why.is_empty() { "(no reason)" } else { why },
                r["keys"]
            )
        })
        .collect();
    if !reasons.is_empty() {
        println!("locks:      {}", reasons.join(", "));
    }
    println!(
        "flows:      {} / {}",
        v["flows"], v["maps"]["flows"]["capacity"]
    );
    println!(
        "key map:    {} / {}",
        v["maps"]["keys"]["entries"], v["maps"]["keys"]["capacity"]
    );
    print_etcd(&v["etcd"]);
    let auto = &v["auto_locks"];
    if auto["count"].as_u64().unwrap_or(0) > 0 {
        let list: Vec<String> = auto["keys"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|k| {
                format!(
                    "{} ({}, {})",
                    k["prefix"].as_str().unwrap_or("?"),
                    k["reason"].as_str().unwrap_or("?"),
                    k["at"].as_str().unwrap_or("?")
                )
            })
            .collect();
        println!(
            "auto locks: {} (`keywall key unlock` undoes one): {}",
            auto["count"],
            list.join(", ")
        );
    }
    if let Some(n) = v["risk"]["shared_suspect_count"].as_u64()
        && n > 0
    {
        println!("shared:     {n} keys used from too many networks (`keywall keys shared`)");
    }
    if let Some(e) = v["policy_error"].as_str() {
        println!("last error: {e}");
    }
    Ok(())
}

/// The lines `keywall status` prints about etcd.
fn print_etcd(v: &Value) {
    if v.is_null() {
        return;
    }
    println!(
        "etcd:       {} {} ({}, read up to revision {})",
        v["endpoints"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(|e| e.as_str())
                .collect::<Vec<_>>()
                .join(","))
            .unwrap_or_default(),
        v["prefix"].as_str().unwrap_or("?"),
        if v["up"].as_bool() == Some(true) {
            "in sync"
        } else {
            "unreachable: enforcing the last applied policy"
        },
        v["synced_revision"]
    );
    if v["up"].as_bool() != Some(true)
        && let Some(e) = v["last_error"].as_str()
    {
        println!("etcd error: {e}");
    }
    for e in v["errors"].as_array().into_iter().flatten() {
        println!(
            "rejected:   {}: {}",
            e["key"].as_str().unwrap_or("?"),
            e["error"].as_str().unwrap_or("?")
        );
    }
}
