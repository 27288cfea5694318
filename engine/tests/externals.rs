//! External input files: keyed by content (through the stat cache), not by path.

use std::path::Path;

use pipe_engine::{Overrides, Registry, StatCache, graph, spec};

fn reg() -> Registry {
    let mut r = Registry::new();
    pipe_engine::testing::register(&mut r);
    r
}

fn key(dir: &Path, yaml: &str, stats: &mut StatCache) -> Result<String, String> {
    let file = dir.join("p.yaml");
    std::fs::write(&file, yaml).map_err(|e| e.to_string())?;
    let r = reg();
    let p = spec::load_with(&file, &r, &Overrides::default(), stats).map_err(|e| e.to_string())?;
    let g = graph::build(p, &r);
    Ok(g.nodes[0].key.to_string())
}

#[test]
fn key_follows_content_not_path() {
    let dir = std::env::temp_dir().join(format!("pipe-ext-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
    std::fs::write(dir.join("a.txt"), "same").expect("write");
    std::fs::write(dir.join("sub/b.txt"), "same").expect("write");
    std::fs::write(dir.join("c.txt"), "other").expect("write");
    let cache = dir.join("statcache.json");
    let mut stats = StatCache::open(&cache);
    let ka = key(
        &dir,
        "stages:\n  r: {kind: read, params: {path: a.txt}}\n",
        &mut stats,
    )
    .expect("a");
    let kb = key(
        &dir,
        "stages:\n  r: {kind: read, params: {path: sub/b.txt}}\n",
        &mut stats,
    )
    .expect("b");
    let kc = key(
        &dir,
        "stages:\n  r: {kind: read, params: {path: c.txt}}\n",
        &mut stats,
    )
    .expect("c");
    assert_eq!(ka, kb, "same content at another path: same key");
    assert_ne!(ka, kc, "other content: other key");
    // ${VAR:-default} expands at plan time
    let kd = key(
        &dir,
        "stages:\n  r: {kind: read, params: {path: \"${PIPE_TEST_UNSET_VAR:-a.txt}\"}}\n",
        &mut stats,
    )
    .expect("default");
    assert_eq!(ka, kd);
    // a missing file is a spec error naming the path and the param
    let e = key(
        &dir,
        "stages:\n  r: {kind: read, params: {path: nope.txt}}\n",
        &mut stats,
    )
    .expect_err("missing");
    assert!(
        e.contains("stages.r.params.path") && e.contains("nope.txt"),
        "{e}"
    );
    // an unset variable without default is a spec error
    let e = key(
        &dir,
        "stages:\n  r: {kind: read, params: {path: \"${PIPE_TEST_UNSET_VAR}\"}}\n",
        &mut stats,
    )
    .expect_err("unset");
    assert!(e.contains("PIPE_TEST_UNSET_VAR"), "{e}");
    // changing the content changes the key, even with a warm stat cache
    stats.save();
    std::fs::write(dir.join("a.txt"), "changed!").expect("write");
    let mut stats = StatCache::open(&cache);
    let ka2 = key(
        &dir,
        "stages:\n  r: {kind: read, params: {path: a.txt}}\n",
        &mut stats,
    )
    .expect("a2");
    assert_ne!(ka, ka2);
    let _ = std::fs::remove_dir_all(&dir);
}
