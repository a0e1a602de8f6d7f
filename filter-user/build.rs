use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let meta = aya_build::cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = meta
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "filter-ebpf")
        .ok_or_else(|| anyhow!("filter-ebpf package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("filter-ebpf has no directory"))?;
    // Nightly by default; KEYWALL_EBPF_TOOLCHAIN=stable (with RUSTC_BOOTSTRAP=1) also works.
    println!("cargo:rerun-if-env-changed=KEYWALL_EBPF_TOOLCHAIN");
    let tc = std::env::var("KEYWALL_EBPF_TOOLCHAIN").ok();
    let toolchain = match tc.as_deref() {
        Some(name) if !name.is_empty() => Toolchain::Custom(Box::leak(name.to_owned().into_boxed_str())),
        _ => Toolchain::Nightly,
    };
    aya_build::build_ebpf(
        [Package {
            name: "filter-ebpf",
            root_dir: root.as_str(),
            ..Default::default()
        }],
        toolchain,
    )
}
