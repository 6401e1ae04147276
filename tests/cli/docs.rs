//! The README documents every parameter of every stage kind, in that kind's section, and every
//! embedded defaults file parses.

#[test]
fn readme_lists_every_stage_parameter() {
    let readme = std::fs::read_to_string(crate::util::repo().join("README.md")).unwrap();
    for stage in pipe::stages::registry() {
        let kind = stage.kind();
        let defaults: toml::Table = stage.defaults().parse().unwrap_or_else(|e| panic!("stages/{kind}.toml: {e}"));
        let header = format!("### `{kind}`");
        let start = readme.find(&header).unwrap_or_else(|| panic!("README has no section {header}"));
        let section = &readme[start + header.len()..];
        let section = &section[..section.find("\n## ").or_else(|| section.find("\n### ")).unwrap_or(section.len())];
        let mut keys = Vec::new();
        for (k, v) in &defaults {
            match v {
                toml::Value::Table(t) => keys.extend(t.keys().map(|s| format!("{k}.{s}"))),
                _ => keys.push(k.clone()),
            }
        }
        for k in keys {
            assert!(section.contains(&format!("`{k}`")), "README section {header} does not document `{k}`");
        }
        let on_disk = std::fs::read_to_string(crate::util::repo().join(format!("stages/{kind}.toml"))).unwrap();
        assert_eq!(on_disk, stage.defaults(), "stages/{kind}.toml is what the binary embeds");
    }
}

#[test]
fn every_committed_pipeline_is_valid() {
    let registry = pipe::stages::registry();
    let dir = crate::util::repo().join("pipelines");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "toml") {
            let p = pipe::engine::config::load(&path, &Default::default(), &registry)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            pipe::engine::graph::build(&p).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 4, "quickstart, qwen_0_6b, qwen_4b and the GPU smoke pipeline at least");
}
