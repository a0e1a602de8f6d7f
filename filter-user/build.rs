use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest).join("../filter-ebpf");
    let root = root.canonicalize()?;
    // Nightly by default; KEYWALL_EBPF_TOOLCHAIN=stable (with RUSTC_BOOTSTRAP=1) also works.
    println!("cargo:rerun-if-env-changed=KEYWALL_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-changed=../filter-common/src");
    let tc = std::env::var("KEYWALL_EBPF_TOOLCHAIN").ok();
    let toolchain = match tc.as_deref() {
        Some(name) if !name.is_empty() => {
            Toolchain::Custom(Box::leak(name.to_owned().into_boxed_str()))
        }
        _ => Toolchain::Nightly,
    };
    aya_build::build_ebpf(
        [Package {
            name: "filter-ebpf",
            root_dir: root.to_str().expect("utf-8 path"),
            ..Default::default()
        }],
        toolchain,
    )
}
