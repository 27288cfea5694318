use super::*;
use crate::kinds::evaluate::testutil;
use crate::nn::augment::{EmpConfig, ImageBatch};
use crate::nn::classifier::NcropSpec;
use crate::nn::losses::cross_entropy_per_example;
use crate::rng::Rng;
use candle::{Device, Module, Tensor};
use serde_json::json;
use std::path::Path;

type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn ok(v: Value) -> Value {
    testutil::normalize("evaluate", v).unwrap_or_else(|e| panic!("valid params: {e:?}"))
}

fn spec(norm: Norm, eps: f64, alpha: f64, steps: usize, random_start: bool) -> AttackSpec {
    AttackSpec {
        norm,
        eps,
        alpha,
        steps,
        random_start,
        restarts: 1,
    }
}

#[test]
fn metric_names_print_radii_as_k_over_255() {
    assert_eq!(format_radius(4.0 / 255.0), "4/255");
    assert_eq!(format_radius(0.031_372_549_019_607_84), "8/255");
    assert_eq!(format_radius(0.0), "0/255");
    assert_eq!(format_radius(1.0), "255/255");
    assert_eq!(format_radius(0.5), "0.5");
    assert_eq!(format_radius(0.1), "0.1");
    assert_eq!(
        format_radius(8.0 / 255.0 + 1e-6),
        format!("{}", 8.0 / 255.0 + 1e-6)
    );
    assert_eq!(
        spec(Norm::Linf, 4.0 / 255.0, 0.01, 2, false).metric(),
        "pgd_linf_4/255_acc"
    );
    assert_eq!(
        spec(Norm::L2, 0.5, 0.1, 20, true).metric(),
        "pgd_l2_0.5_acc"
    );
    assert_eq!(
        spec(Norm::L1, 12.0 / 255.0, 0.1, 20, true).name(),
        "pgd_l1_12/255"
    );
}

#[test]
fn presets_fill_attacks_and_equivalent_params_key_alike() {
    let sound = ok(json!({"attacks": [{"eps": "8/255"}, {"eps": "4/255"}]}));
    let custom = ok(json!({"preset": "custom", "attacks": [
        {"norm": "linf", "eps": 4.0 / 255.0, "alpha": "1/255", "steps": 20, "random_start": true, "restarts": 1},
        {"eps": "8/255", "alpha": "2/255", "steps": 20, "random_start": true},
    ]}));
    assert_eq!(
        sound, custom,
        "the sound preset written out, in another order"
    );
    assert!(sound.get("preset").is_none());
    assert_eq!(
        ok(json!({})),
        sound,
        "the default attacks are the paper table's, sound"
    );
    assert_eq!(sound["batch_size"], json!(100));
    assert_eq!(sound["seed"], json!(0));
    assert_eq!(sound["device"], json!("auto"));
    let emp = ok(json!({"preset": "faithful_emp", "attacks": [{"eps": "4/255"}]}));
    assert_eq!(
        emp["attacks"],
        json!([{"norm": "linf", "eps": 4.0 / 255.0, "alpha": 0.01, "steps": 2, "random_start": false, "restarts": 1}])
    );
    let simclr =
        ok(json!({"preset": "faithful_simclr", "attacks": [{"eps": "4/255", "restarts": 3}]}));
    assert_eq!(
        simclr["attacks"],
        json!([{"norm": "linf", "eps": 4.0 / 255.0, "alpha": 0.01, "steps": 20, "random_start": false, "restarts": 3}])
    );
    // what an attack gives wins over the preset
    let mixed = ok(json!({"preset": "faithful_emp", "attacks": [{"eps": "4/255", "steps": 7}]}));
    assert_eq!(mixed["attacks"][0]["steps"], json!(7));
    assert_eq!(mixed["attacks"][0]["alpha"], json!(0.01));
    // a random start cannot matter for l_1 or at eps 0
    let l1 = ok(json!({"attacks": [{"norm": "l1", "eps": 1}, {"eps": 0}]}));
    assert_eq!(l1["attacks"][0]["random_start"], json!(false));
    assert_eq!(
        l1["attacks"][0]["alpha"],
        json!(0.0),
        "eps 0, alpha eps/4 sorted first"
    );
    assert_eq!(l1["attacks"][1]["norm"], json!("l1"));
    assert_eq!(l1["attacks"][1]["alpha"], json!(0.25));
    assert_ne!(
        sound,
        ok(json!({"attacks": [{"eps": "8/255"}, {"eps": "4/255", "restarts": 2}]}))
    );
}

#[test]
fn bad_params_are_named() {
    let e = testutil::errors(
        "evaluate",
        json!({"preset": "custom", "attacks": [{"eps": 0.1, "steps": 3, "random_start": false}]}),
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("attacks[0].alpha: preset `custom` needs")),
        "{e:?}"
    );
    let e = testutil::errors(
        "evaluate",
        json!({"attacks": [{"eps": 0.1, "restarts": 0}, {"eps": -1}], "batch_size": 0, "test_subset": 0}),
    );
    for p in [
        "attacks[0].restarts:",
        "attacks[1].eps:",
        "batch_size:",
        "test_subset:",
    ] {
        assert!(e.iter().any(|m| m.starts_with(p)), "{p} {e:?}");
    }
    let e = testutil::errors(
        "evaluate",
        json!({"attacks": [{"eps": "8/255"}, {"eps": "8/255", "steps": 2}]}),
    );
    assert!(
        e.iter().any(
            |m| m.starts_with("attacks[1]: same norm and eps as attacks[0]")
                && m.contains("pgd_linf_8/255_acc")
        ),
        "{e:?}"
    );
    let e = testutil::errors("evaluate", json!({"attacks": [{"eps": "8/zero"}]}));
    assert!(
        e.iter()
            .any(|m| m.starts_with("attacks[0].eps:") && m.contains("8/255")),
        "{e:?}"
    );
    let e = testutil::errors("evaluate", json!({"attacks": [{"norm": "l3", "eps": 1}]}));
    assert!(e.iter().any(|m| m.starts_with("attacks[0].norm:")), "{e:?}");
    let e = testutil::errors("evaluate", json!({"attacks": [{"epsilon": 1}]}));
    assert!(
        e.iter()
            .any(|m| m.starts_with("attacks[0]") && m.contains("epsilon")),
        "{e:?}"
    );
    let e = testutil::errors("evaluate", json!({"preset": "robust"}));
    assert!(e.iter().any(|m| m.starts_with("preset:")), "{e:?}");
}

#[test]
fn subset_indices_pick_the_balanced_subset() -> TestResult {
    let d = testutil::data();
    let idx = subset_indices(&d.test, &d.classes, Some(3), 7)?;
    assert_eq!(idx.len(), 12);
    assert!(idx.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        d.test.select(&idx),
        d.test.balanced_subset(&d.classes, 3, 7, "test")?
    );
    assert_ne!(idx, subset_indices(&d.test, &d.classes, Some(3), 8)?);
    assert_eq!(
        subset_indices(&d.test, &d.classes, None, 7)?,
        (0..64).collect::<Vec<_>>()
    );
    assert!(subset_indices(&d.test, &d.classes, Some(17), 7).is_err());
    Ok(())
}

fn run_eval(
    clf: &Classifier,
    test: &crate::data::Split,
    attacks: Vec<AttackSpec>,
    batch_size: usize,
    seed: u64,
) -> std::result::Result<EvalReport, Error> {
    let cfg = EvalConfig {
        attacks,
        autoattack: Vec::new(),
        batch_size,
        seed,
    };
    evaluate(clf, test, &cfg, &Device::Cpu, &Hooks::default())
}

#[test]
fn accuracy_falls_with_eps_on_a_trained_model() -> TestResult {
    let d = testutil::data();
    let clf = testutil::trained_classifier()?;
    // clean accuracy from one plain forward of the whole test split
    let x = batch_tensor(&d.test, 0, d.test.n, &Device::Cpu)?;
    let clean = count_correct(&clf.logits(&x, false)?, &d.test.labels)?;
    let n = d.test.n as f64;
    assert!(
        clean as f64 / n >= 0.6,
        "the fixture is not trained: clean accuracy {}",
        clean as f64 / n
    );
    let attacks: Vec<AttackSpec> = [0.0, 2.0, 8.0]
        .iter()
        .map(|k| spec(Norm::Linf, k / 255.0, k / 255.0 / 4.0, 10, true))
        .collect();
    let cfg = EvalConfig {
        attacks: attacks.clone(),
        autoattack: Vec::new(),
        batch_size: 24,
        seed: 1,
    };
    let r = evaluate(&clf, &d.test, &cfg, &Device::Cpu, &Hooks::default())?;
    assert_eq!(r.n, 64);
    assert_eq!(
        r.clean_correct, clean,
        "batched clean accuracy differs from one forward"
    );
    assert_eq!(
        r.attack_correct[0], r.clean_correct,
        "eps 0 must give the clean accuracy exactly"
    );
    assert!(r.attack_correct[1] < r.clean_correct, "{r:?}");
    assert!(r.attack_correct[2] < r.attack_correct[1], "{r:?}");
    // metrics.json
    let m = metrics_json(&cfg, &r, None, 1.5, "cpu");
    assert_eq!(m["clean_acc"], json!(clean as f64 / n));
    assert_eq!(m["pgd_linf_0/255_acc"], m["clean_acc"]);
    assert_eq!(
        m["pgd_linf_2/255_acc"],
        json!(r.attack_correct[1] as f64 / n)
    );
    assert_eq!(
        m["pgd_linf_8/255_acc"],
        json!(r.attack_correct[2] as f64 / n)
    );
    assert_eq!(
        m["attacks"]["pgd_linf_8/255_acc"],
        json!({"norm": "linf", "eps": 8.0 / 255.0, "alpha": 2.0 / 255.0, "steps": 10, "random_start": true, "restarts": 1})
    );
    assert_eq!(
        (m["n_test"].clone(), m["head"].clone(), m["seconds"].clone()),
        (json!(64), json!("full_image"), json!(1.5))
    );
    assert!(m.get("transfer_acc").is_none() && m.get("n_views").is_none());
    // the same seed gives the same numbers; a stream per attack, so dropping one changes none
    let again = run_eval(&clf, &d.test, attacks[1..].to_vec(), 24, 1)?;
    assert_eq!(again.attack_correct, r.attack_correct[1..].to_vec());
    Ok(())
}

#[test]
fn deterministic_attacks_match_a_direct_pgd() -> TestResult {
    // Without a random start the attack is a function of the batch: evaluate must count what
    // a direct `pgd` call on the same batches gives (uneven last batch: 64 = 3 x 20 + 4).
    let d = testutil::data();
    let clf = testutil::trained_classifier()?;
    let attacks = vec![
        spec(Norm::L2, 0.5, 0.15, 4, false),
        AttackSpec {
            restarts: 2,
            ..spec(Norm::L1, 6.0, 2.0, 3, false)
        },
    ];
    let r = run_eval(&clf, &d.test, attacks.clone(), 20, 0)?;
    let frozen = clf.frozen()?;
    for (a, s) in attacks.iter().enumerate() {
        let mut correct = 0;
        for start in (0..64).step_by(20) {
            let b = 20.min(64 - start);
            let labels = &d.test.labels[start..start + b];
            let y = Tensor::from_slice(labels, b, &Device::Cpu)?;
            let x = batch_tensor(&d.test, start, b, &Device::Cpu)?;
            let objective = |xa: &Tensor| cross_entropy_per_example(&frozen.logits(xa, false)?, &y);
            let res = crate::nn::attacks::pgd(&x, objective, &s.pgd_config(), &mut Rng::new(99))?;
            correct += count_correct(&frozen.logits(&res.adv, false)?, labels)?;
        }
        assert_eq!(r.attack_correct[a], correct, "{}", s.name());
        assert!(
            correct < r.clean_correct,
            "{}: {correct} of {}",
            s.name(),
            r.clean_correct
        );
    }
    Ok(())
}

#[test]
fn ncrop_head_is_attacked_through_its_views() -> TestResult {
    let d = testutil::data();
    let nspec = crate::nn::classifier::ClassifierSpec {
        ncrop: Some(NcropSpec {
            n_views: 3,
            scale: [0.5, 1.0],
            ratio: [0.75, 4.0 / 3.0],
        }),
        ..testutil::spec()
    };
    let clf = testutil::classifier_with(Some(&nspec))?;
    let attacks = vec![
        spec(Norm::Linf, 0.0, 0.0, 3, true),
        spec(Norm::Linf, 8.0 / 255.0, 2.0 / 255.0, 5, true),
    ];
    let r = run_eval(&clf, &d.test, attacks, 16, 9)?;
    assert_eq!(r.n_views, Some(3));
    // the clean accuracy recomputed from the documented view streams
    let generator = EmpConfig {
        n_views: 3,
        scale: [0.5, 1.0],
        ratio: [0.75, 4.0 / 3.0],
        ..EmpConfig::crop(3)
    }
    .build()?;
    let view_seed = Rng::derive(9, &[runner::VIEW_STREAM]).next_u64();
    let mut clean = 0;
    for (k, start) in (0..64).step_by(16).enumerate() {
        let il = d.test.image_len();
        let images = ImageBatch::new(&d.test.images[start * il..(start + 16) * il], 16, 32, 32)?;
        let v = generator.generate(images, view_seed, k as u64)?;
        let views = Tensor::from_vec(v.data, (48, 3, 32, 32), &Device::Cpu)?;
        // the head on the mean feature of each image's 3 views (view-major rows)
        let f = clf.features(&views, false)?.reshape((3, 16, 64))?.mean(0)?;
        let logits = clf.head().forward(&f)?;
        clean += count_correct(&logits, &d.test.labels[start..start + 16])?;
    }
    assert_eq!(r.clean_correct, clean);
    assert!(
        clean as f64 / 64.0 > 0.4,
        "n-crop head of the fixture at chance: {clean}/64"
    );
    assert_eq!(
        r.attack_correct[0], r.clean_correct,
        "eps 0 through the views"
    );
    assert!(r.attack_correct[1] < r.clean_correct, "{r:?}");
    let m = metrics_json(
        &EvalConfig {
            attacks: vec![],
            autoattack: vec![],
            batch_size: 16,
            seed: 9,
        },
        &EvalReport {
            attack_correct: vec![],
            ..r
        },
        None,
        0.0,
        "cpu",
    );
    assert_eq!(
        (m["head"].clone(), m["n_views"].clone()),
        (json!("ncrop"), json!(3))
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Through the engine: dataset -> (fixture) classifier -> attack_dataset -> evaluate.

/// Copies a classifier from `dir` (a test stand-in for `finetune`).
struct FixtureClassifier;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureParams {
    dir: String,
}

impl TypedStage for FixtureClassifier {
    const KIND: &'static str = "fixture_classifier";
    const VERSION: u32 = 1;
    type Params = FixtureParams;
    fn inputs() -> Slots {
        Slots::Fixed(&[])
    }
    fn outputs(_: &FixtureParams) -> Vec<String> {
        vec![WEIGHTS_FILE.into(), SPEC_FILE.into()]
    }
    fn run(p: &FixtureParams, ctx: &mut StageCtx<'_>) -> Result<(), BoxError> {
        for f in [WEIGHTS_FILE, SPEC_FILE] {
            std::fs::copy(Path::new(&p.dir).join(f), ctx.out_path(f))?;
        }
        Ok(())
    }
}

/// Runs `yaml` (written to `dir/p.yaml`) through the engine with the registry plus
/// [`FixtureClassifier`], one job, a store in `dir/store`.
fn run_with_fixture(
    dir: &Path,
    yaml: &str,
    keep_going: bool,
) -> std::result::Result<
    (
        pipe_engine::plan::Plan,
        pipe_cache::Store,
        pipe_engine::exec::Summary,
    ),
    Box<dyn std::error::Error + Send + Sync>,
> {
    let cancel = std::sync::atomic::AtomicBool::new(false);
    run_observed(dir, yaml, keep_going, &cancel, &mut pipe_engine::Quiet)
}

/// [`run_with_fixture`] with a cancel flag and an observer of the run's events.
fn run_observed(
    dir: &Path,
    yaml: &str,
    keep_going: bool,
    cancel: &std::sync::atomic::AtomicBool,
    observer: &mut dyn pipe_engine::exec::Observer,
) -> std::result::Result<
    (
        pipe_engine::plan::Plan,
        pipe_cache::Store,
        pipe_engine::exec::Summary,
    ),
    Box<dyn std::error::Error + Send + Sync>,
> {
    use pipe_engine::{Overrides, graph, spec};
    let mut reg = pipe_engine::Registry::new();
    crate::register_all(&mut reg);
    reg.register_typed::<FixtureClassifier>();
    let store = pipe_cache::Store::open(dir.join("store"))?;
    let file = dir.join("p.yaml");
    std::fs::write(&file, yaml)?;
    let p = spec::load(&file, &reg, &Overrides::default())?;
    let plan = pipe_engine::plan::plan(graph::build(p, &reg), &store, &[])?;
    let opts = pipe_engine::RunOptions {
        jobs: 1,
        gpus: 0,
        keep_going,
        pipe_version: "test".into(),
        ..Default::default()
    };
    let s = pipe_engine::exec::run(&plan, &reg, &store, &opts, cancel, observer);
    Ok((plan, store, s))
}

#[test]
fn end_to_end_through_the_engine() -> TestResult {
    let tmp = crate::data::testutil::TempDir::new("evaluate-e2e");
    let dir = tmp.path();
    let fixture = dir.join("fixture");
    std::fs::create_dir_all(&fixture)?;
    testutil::write_classifier(&fixture, None)?;
    let yaml = format!(
        "stages:
  data:
    kind: dataset
    params: {{source: synthetic, n_classes: 4, n_train: 256, n_test: 64, seed: 5}}
  clf:
    kind: fixture_classifier
    params: {{dir: '{}'}}
  adv:
    kind: attack_dataset
    inputs: {{model: clf, dataset: data}}
    params: {{eps: 16/255, alpha: 4/255, steps: 10, test_subset: 4, batch_size: 10}}
  ev:
    kind: evaluate
    inputs: {{model: clf, dataset: data, adversarial: adv}}
    params: {{attacks: [{{eps: 8/255, steps: 3}}, {{norm: l2, eps: 0.25}}], test_subset: 4, batch_size: 10}}
",
        fixture.display()
    );
    let (plan, store, s) = run_with_fixture(dir, &yaml, false)?;
    assert!(!s.failed(), "{:?}", s.results);
    let entry = |id: &str| -> std::result::Result<
        pipe_cache::Entry,
        Box<dyn std::error::Error + Send + Sync>,
    > {
        let node = plan.graph.nodes.iter().find(|n| n.id == id).ok_or("node")?;
        Ok(store.get(node.key.key())?.ok_or("committed")?)
    };
    let json_of = |e: &pipe_cache::Entry| -> std::result::Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        Ok(serde_json::from_slice(&std::fs::read(e.file("metrics.json")?)?)?)
    };
    let adv = entry("adv")?;
    let am = json_of(&adv)?;
    let set = AdversarialSet::load(&adv.file(ADVERSARIAL_FILE)?)?;
    assert_eq!(set.n, 16);
    assert_eq!(am["n"], json!(16));
    assert_eq!(set.attack["name"], json!("pgd_linf_16/255"));
    assert_eq!(set.attack["steps"], json!(10));
    let (clean_acc, adv_acc) = (
        am["clean_acc"].as_f64().ok_or("clean")?,
        am["adv_acc"].as_f64().ok_or("adv")?,
    );
    assert!(
        adv_acc < clean_acc,
        "the stored attack fooled nothing: {am}"
    );
    let em = json_of(&entry("ev")?)?;
    assert_eq!(em["n_test"], json!(16));
    // the same subset (seed 0), the same classifier: the same clean accuracy, and the stored
    // set's accuracy is the white-box accuracy attack_dataset measured
    assert_eq!(em["clean_acc"], am["clean_acc"]);
    assert_eq!(em["transfer_acc"], am["adv_acc"]);
    assert_eq!(em["transfer_clean_acc"], am["clean_acc"]);
    assert_eq!(em["transfer_n"], json!(16));
    assert_eq!(em["transfer_attack"], set.attack);
    for k in ["pgd_linf_8/255_acc", "pgd_l2_0.25_acc"] {
        let acc = em[k].as_f64().ok_or(k)?;
        assert!(
            (0.0..=em["clean_acc"].as_f64().ok_or("clean")?).contains(&acc),
            "{k}: {em}"
        );
        assert!(em["attacks"][k].is_object(), "{k}: {em}");
    }
    assert_eq!(em["attacks"]["pgd_l2_0.25_acc"]["steps"], json!(20));
    assert_eq!(em["device"], json!("cpu"));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// AutoAttack

#[test]
fn autoattack_params_are_written_out_and_keyed() {
    let none = ok(json!({}));
    assert!(
        none.get("autoattack").is_none(),
        "a node without autoattack keys as before: {none}"
    );
    let one = ok(json!({"autoattack": [{"eps": "8/255"}]}));
    assert_eq!(
        one["autoattack"],
        json!([{"eps": 8.0 / 255.0, "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"],
                "apgd_iters": 100, "fab_iters": 100, "square_queries": 5000,
                "square_rescale": false, "n_target_classes": 9}])
    );
    let written = ok(
        json!({"autoattack": [{"eps": 8.0 / 255.0, "version": "original",
        "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "apgd_iters": 100}]}),
    );
    assert_eq!(one, written, "the version's values written out key alike");
    let ta = ok(json!({"autoattack": [{"eps": "4/255", "version": "torchattacks"}]}));
    assert_eq!(ta["autoattack"][0]["apgd_iters"], json!(10));
    // torchattacks at its pinned commit: FAB 10 steps, n_classes - 1 targets.
    assert_eq!(ta["autoattack"][0]["fab_iters"], json!(10));
    assert_eq!(ta["autoattack"][0]["n_target_classes"], json!("all"));
    assert_eq!(ta["autoattack"][0]["square_rescale"], json!(true));
    assert!(ta["autoattack"][0].get("version").is_none());
    assert_eq!(
        ta,
        ok(
            json!({"autoattack": [{"eps": "4/255", "n_target_classes": "all", "fab_iters": 10,
            "apgd_iters": 10, "square_rescale": true}]})
        ),
        "`all` written out keys as the preset"
    );
    let two =
        ok(json!({"autoattack": [{"eps": "8/255"}, {"eps": "4/255", "attacks": ["apgd-ce"]}]}));
    assert_eq!(
        two["autoattack"][0]["eps"],
        json!(4.0 / 255.0),
        "sorted by eps"
    );
    assert_ne!(one, two);
    assert_ne!(
        one,
        ok(json!({"autoattack": [{"eps": "8/255", "fab_iters": 50}]}))
    );

    let e = testutil::errors(
        "evaluate",
        json!({"autoattack": [{"eps": "8/255"}, {"eps": 8.0 / 255.0}]}),
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("autoattack[1]") && m.contains("aa_linf_8/255_acc")),
        "{e:?}"
    );
    let e = testutil::errors("evaluate", json!({"autoattack": [{"eps": 8}]}));
    assert!(
        e.iter().any(|m| m.starts_with("autoattack[0].eps")),
        "{e:?}"
    );
    let e = testutil::errors(
        "evaluate",
        json!({"autoattack": [{"eps": "8/255", "attacks": []}]}),
    );
    assert!(
        e.iter().any(|m| m.starts_with("autoattack[0].attacks")),
        "{e:?}"
    );
    let e = testutil::errors(
        "evaluate",
        json!({"autoattack": [{"eps": "8/255", "attacks": ["apgd-ce", "apgd-ce"]}]}),
    );
    assert!(e.iter().any(|m| m.contains("listed twice")), "{e:?}");
    let e = testutil::errors(
        "evaluate",
        json!({"autoattack": [{"eps": "8/255", "attacks": ["pgd"]}]}),
    );
    assert!(!e.is_empty(), "an unknown attack name is refused");
    for bad in [json!(0), json!("some")] {
        let e = testutil::errors(
            "evaluate",
            json!({"autoattack": [{"eps": "8/255", "n_target_classes": bad}]}),
        );
        assert!(
            e.iter()
                .any(|m| m.contains("n_target_classes") || m.contains("`all`")),
            "{bad}: {e:?}"
        );
    }
}

#[test]
fn autoattack_on_a_trained_model() -> TestResult {
    let d = testutil::data();
    let clf = testutil::trained_classifier()?;
    let small = |eps: f64| AaConfig {
        apgd_iters: 10,
        fab_iters: 10,
        square_queries: 30,
        ..AaConfig::original(eps)
    };
    let cfg = EvalConfig {
        attacks: vec![spec(Norm::Linf, 8.0 / 255.0, 2.0 / 255.0, 10, true)],
        autoattack: vec![small(8.0 / 255.0), small(0.0)],
        batch_size: 32,
        seed: 4,
    };
    let r = evaluate(&clf, &d.test, &cfg, &Device::Cpu, &Hooks::default())?;
    let (aa, zero) = (&r.autoattack[0], &r.autoattack[1]);
    assert_eq!(zero.robust, r.clean_correct, "eps 0 fools nothing");
    assert!(aa.robust < r.clean_correct, "{r:?}");
    // AutoAttack contains a stronger PGD (APGD-CE) and more: no better than PGD-10, up to the
    // randomness of the starts (2 of 64 images)
    assert!(aa.robust <= r.attack_correct[0] + 2, "{r:?}");
    assert_eq!(aa.after.len(), 4);
    assert!(aa.after.windows(2).all(|w| w[1] <= w[0]), "{aa:?}");
    assert_eq!(aa.after[3], aa.robust);
    assert!(aa.after[0] <= r.clean_correct);
    // the same seed, the same counts; metrics.json names the run
    assert_eq!(
        evaluate(&clf, &d.test, &cfg, &Device::Cpu, &Hooks::default())?.autoattack,
        r.autoattack
    );
    let m = metrics_json(&cfg, &r, None, 1.0, "cpu");
    assert_eq!(m["aa_linf_8/255_acc"], json!(aa.robust as f64 / 64.0));
    assert_eq!(m["aa_linf_0/255_acc"], m["clean_acc"]);
    let run = &m["autoattack"]["aa_linf_8/255_acc"];
    assert_eq!(run["config"]["fab_iters"], json!(10));
    assert_eq!(run["after"]["square"], m["aa_linf_8/255_acc"]);
    assert_eq!(run["after"]["apgd-ce"], json!(aa.after[0] as f64 / 64.0));

    // an n-crop classifier is refused
    let nspec = crate::nn::classifier::ClassifierSpec {
        ncrop: Some(NcropSpec {
            n_views: 2,
            scale: [0.5, 1.0],
            ratio: [0.75, 4.0 / 3.0],
        }),
        ..testutil::spec()
    };
    let nclf = testutil::classifier_with(Some(&nspec))?;
    let e = evaluate(&nclf, &d.test, &cfg, &Device::Cpu, &Hooks::default())
        .expect_err("n-crop")
        .to_string();
    assert!(e.contains("full-image"), "{e}");
    Ok(())
}

#[test]
fn an_interrupted_evaluation_resumes_from_its_journal_bit_identically() -> TestResult {
    use crate::journal::Journal;
    use std::sync::atomic::{AtomicU64, Ordering};
    let d = testutil::data();
    let clf = testutil::trained_classifier()?;
    let cfg = EvalConfig {
        attacks: vec![
            spec(Norm::Linf, 8.0 / 255.0, 2.0 / 255.0, 5, true),
            spec(Norm::L2, 0.5, 0.1, 3, true),
        ],
        autoattack: vec![AaConfig {
            apgd_iters: 5,
            fab_iters: 5,
            square_queries: 10,
            ..AaConfig::original(8.0 / 255.0)
        }],
        batch_size: 16,
        seed: 3,
    };
    let il = d.test.image_len();
    let run = |hooks: &Hooks<'_>, journal: &Journal| -> std::result::Result<_, Error> {
        let mut kept = vec![vec![0f32; d.test.n * il]; 2];
        let mut keep = |a: usize, s: usize, adv: &Tensor| -> candle::Result<()> {
            let v = adv.flatten_all()?.to_vec1::<f32>()?;
            kept[a][s * il..s * il + v.len()].copy_from_slice(&v);
            Ok(())
        };
        let r = evaluate_with(
            &clf,
            &d.test,
            &cfg,
            &Device::Cpu,
            hooks,
            journal,
            Some(&mut keep),
        )?;
        Ok((r, kept))
    };
    let counts = |r: &EvalReport| {
        (
            r.n,
            r.clean_correct,
            r.attack_correct.clone(),
            r.autoattack.clone(),
        )
    };
    let (fresh, fresh_adv) = run(&Hooks::default(), &Journal::off())?;
    assert!(fresh.attack_correct[0] < fresh.clean_correct, "{fresh:?}");
    // interrupted once two of the four batches are done
    let tmp = crate::data::testutil::TempDir::new("evaluate-journal");
    let done = AtomicU64::new(0);
    let progress = |d: u64, _: u64, _: &str| {
        done.fetch_max(d, Ordering::Relaxed);
    };
    let cancelled = || done.load(Ordering::Relaxed) >= 32;
    let hooks = Hooks {
        progress: &progress,
        cancelled: &cancelled,
        ..Hooks::default()
    };
    let first = Journal::at(tmp.path());
    let err = run(&hooks, &first).err().map(|e| e.to_string());
    assert_eq!(err.as_deref(), Some("interrupted"));
    // the rerun replays them, adversarial images included, and computes the other two
    let again = Journal::at(tmp.path());
    let (resumed, resumed_adv) = run(&Hooks::default(), &again)?;
    assert_eq!(again.replayed(), 2);
    assert_eq!(counts(&resumed), counts(&fresh));
    assert!(
        resumed_adv == fresh_adv,
        "the kept adversarial images differ"
    );
    // a run without the callback replays the same records (it needs only their counts)
    let plain = Journal::at(tmp.path());
    let r = evaluate_with(
        &clf,
        &d.test,
        &cfg,
        &Device::Cpu,
        &Hooks::default(),
        &plain,
        None,
    )?;
    assert_eq!((plain.replayed(), counts(&r)), (4, counts(&fresh)));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The test-time defence

#[test]
fn the_log_notes_attacks_reversed_at_another_ratio_than_r_mao() {
    let attack = |norm: Norm, k: f64| AttackSpec {
        norm,
        eps: k / 255.0,
        alpha: 2.0 / 255.0,
        steps: 10,
        random_start: true,
        restarts: 1,
    };
    let spec = |p: Value| DefenseParam::resolve(&serde_json::from_value(p).expect("defense"));
    let r_mao = spec(json!({}));
    // 8/255 is reversed at R-MAO's 16/255: nothing to say; l_2 attacks are not R-MAO's l_inf.
    let plain = [attack(Norm::Linf, 8.0), attack(Norm::L2, 128.0)];
    assert_eq!(defense::radius_note(&r_mao, &plain), None);
    // The default attack list adds 4/255, which R-MAO would reverse at 8/255.
    let both = [attack(Norm::Linf, 4.0), attack(Norm::Linf, 8.0)];
    let note = defense::radius_note(&r_mao, &both).expect("a note");
    assert!(
        note.contains("eps 16/255") && note.contains("pgd_linf_4/255 (R-MAO: 8/255)"),
        "{note}"
    );
    assert!(!note.contains("pgd_linf_8/255"), "{note}");
    // Set to twice the attack's: nothing; R-DLSP's attack-norm reversal and the noise
    // baseline are not R-MAO's.
    let four = [attack(Norm::Linf, 4.0)];
    assert_eq!(
        defense::radius_note(&spec(json!({"eps": "8/255"})), &four),
        None
    );
    assert_eq!(
        defense::radius_note(&spec(json!({"preset": "r_dlsp"})), &both),
        None
    );
    assert_eq!(
        defense::radius_note(&spec(json!({"method": "random"})), &both),
        None
    );
}

#[test]
fn defense_params_are_completed_by_their_preset_and_keyed() {
    let p = ok(json!({"defense": {}}));
    assert_eq!(
        p["defense"],
        json!({"method": "reverse", "norm": "linf", "eps": 16.0 / 255.0, "alpha": 2.0 / 255.0,
               "steps": 40, "views": 4, "project_box": true, "select": "last", "batch_size": 512})
    );
    let d = ok(json!({"defense": {"preset": "r_dlsp"}}));
    assert_eq!(
        d["defense"],
        json!({"method": "reverse", "norm": "attack", "eps": 8.0 / 255.0, "alpha": 2.0 / 255.0,
               "steps": 5, "views": 2, "project_box": false, "select": "best_measured",
               "batch_size": 256})
    );
    // written out by hand: the same node
    let explicit = ok(
        json!({"defense": {"norm": "attack", "eps": "8/255", "alpha": "2/255",
        "steps": 5, "views": 2, "project_box": false, "select": "best_measured", "batch_size": 256}}),
    );
    assert_eq!(explicit, d);
    // random noise keeps what applies only
    let r = ok(json!({"defense": {"method": "random", "steps": 9}}));
    assert_eq!(
        r["defense"],
        json!({"method": "random", "eps": 16.0 / 255.0, "batch_size": 512})
    );
    // no defense: no key
    assert!(ok(json!({})).get("defense").is_none());
    // the defence-aware attack: keyed only when asked for, views default 2
    let a = ok(json!({"defense": {"adaptive_lambda": 10}}));
    assert_eq!(
        (
            a["defense"]["adaptive_lambda"].clone(),
            a["defense"]["adaptive_views"].clone()
        ),
        (json!(10.0), json!(2))
    );
    assert_ne!(a, p);
    let per = ok(json!({"defense": {"augment": "per_image"}}));
    assert_eq!(per["defense"]["augment"], json!("per_image"));
    assert_ne!(per, p);
    assert_eq!(ok(json!({"defense": {"augment": "batch"}})), p);
    let e = testutil::errors(
        "evaluate",
        json!({"defense": {"method": "random", "adaptive_lambda": 10}}),
    );
    assert!(
        e.iter().any(|m| m.starts_with("defense.adaptive_lambda")),
        "{e:?}"
    );
    let e = testutil::errors(
        "evaluate",
        json!({"defense": {"views": 1, "batch_size": 1, "eps": 2.0, "nope": 0}}),
    );
    assert!(e.iter().any(|m| m.contains("nope")), "{e:?}");
    let e = testutil::errors(
        "evaluate",
        json!({"defense": {"views": 1, "batch_size": 1, "eps": 2.0}}),
    );
    for f in ["defense.views", "defense.batch_size", "defense.eps"] {
        assert!(e.iter().any(|m| m.starts_with(f)), "{f}: {e:?}");
    }
}

/// Through the engine: a classifier, its SSL head, and evaluations with the reversal, with a
/// reversal of radius 0 (which must change nothing: its accuracies equal the undefended
/// ones), with R-DLSP's preset and with random noise; inputs that do not fit are named.
/// The stages the defence tests build on: `data` (synthetic, 4 classes), `clf` (the fixture
/// classifier written to `fixture`) and `head` (an `ssl_head` trained on it).
fn defense_base(fixture: &Path) -> String {
    format!(
        "stages:
  data:
    kind: dataset
    params: {{source: synthetic, n_classes: 4, n_train: 256, n_test: 64, seed: 5}}
  clf:
    kind: fixture_classifier
    params: {{dir: '{}'}}
  head:
    kind: ssl_head
    inputs: {{model: clf, dataset: data}}
    params: {{epochs: 2, batch_size: 64, hidden_dim: 16}}
",
        fixture.display()
    )
}

#[test]
fn defense_end_to_end_through_the_engine() -> TestResult {
    let tmp = crate::data::testutil::TempDir::new("evaluate-defense");
    let dir = tmp.path();
    let fixture = dir.join("fixture");
    std::fs::create_dir_all(&fixture)?;
    testutil::write_classifier(&fixture, None)?;
    let common = "attacks: [{eps: 8/255, steps: 3}, {norm: l2, eps: 0.5, steps: 3}], test_subset: 6, batch_size: 12";
    let yaml = format!(
        "{}  rev:
    kind: evaluate
    inputs: {{model: clf, dataset: data, ssl_head: head}}
    params: {{{common}, defense: {{steps: 4, batch_size: 12}}}}
  zero:
    kind: evaluate
    inputs: {{model: clf, dataset: data, ssl_head: head}}
    params: {{{common}, defense: {{eps: 0, steps: 2, batch_size: 12, adaptive_lambda: 0}}}}
  adapt:
    kind: evaluate
    inputs: {{model: clf, dataset: data, ssl_head: head}}
    params: {{{common}, defense: {{steps: 2, batch_size: 12, adaptive_lambda: 10}}}}
  dlsp:
    kind: evaluate
    inputs: {{model: clf, dataset: data, ssl_head: head}}
    params: {{{common}, defense: {{preset: r_dlsp, batch_size: 12}}}}
  noise:
    kind: evaluate
    inputs: {{model: clf, dataset: data}}
    params: {{{common}, defense: {{method: random, eps: 8/255}}}}
  plain:
    kind: evaluate
    inputs: {{model: clf, dataset: data}}
    params: {{{common}}}
",
        defense_base(&fixture)
    );
    // a misconnected `ssl_head` is a plan-time error, at its line, before anything runs
    for (stage, line, want) in [
        (
            "  no_head:\n    kind: evaluate\n    inputs: {model: clf, dataset: data}\n    params: {defense: {}}\n",
            3,
            "stages.no_head.inputs: `defense` reverses with an SSL head: add an `ssl_head` input",
        ),
        (
            "  stray:\n    kind: evaluate\n    inputs: {model: clf, dataset: data, ssl_head: head}\n    params: {}\n",
            3,
            "stages.stray.inputs.ssl_head: an `ssl_head` input is only read by the `defense` param",
        ),
        (
            "  noised:\n    kind: evaluate\n    inputs: {model: clf, dataset: data, ssl_head: head}\n    params: {defense: {method: random}}\n",
            3,
            "stages.noised.inputs.ssl_head: `defense.method: random` reads no `ssl_head` input",
        ),
    ] {
        let bad = format!("{yaml}{stage}");
        let file = dir.join("bad.yaml");
        std::fs::write(&file, &bad)?;
        let mut reg = pipe_engine::Registry::new();
        crate::register_all(&mut reg);
        reg.register_typed::<FixtureClassifier>();
        let err = pipe_engine::spec::load(&file, &reg, &pipe_engine::Overrides::default())
            .err()
            .ok_or("a misconnected ssl_head must not load")?
            .to_string();
        let at = bad.lines().count() - 4 + line;
        assert!(err.contains(&format!("bad.yaml:{at}")), "line {at}: {err}");
        assert!(err.contains(want), "{err}");
    }
    let (plan, store, s) = run_with_fixture(dir, &yaml, true)?;
    let failed: Vec<String> = s
        .results
        .iter()
        .zip(&plan.graph.nodes)
        .filter_map(|(r, n)| match &r.outcome {
            pipe_engine::exec::Outcome::Failed(m) => Some(format!("{}: {m}", n.id)),
            _ => None,
        })
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    let metrics =
        |id: &str| -> std::result::Result<Value, Box<dyn std::error::Error + Send + Sync>> {
            let node = plan.graph.nodes.iter().find(|n| n.id == id).ok_or("node")?;
            let e = store.get(node.key.key())?.ok_or("committed")?;
            Ok(serde_json::from_slice(&std::fs::read(
                e.file("metrics.json")?,
            )?)?)
        };
    let plain = metrics("plain")?;
    let zero = metrics("zero")?;
    for k in ["clean", "pgd_linf_8/255", "pgd_l2_0.5"] {
        assert_eq!(
            zero[format!("{k}_reversed_acc")],
            plain[format!("{k}_acc")],
            "{k}: {zero}"
        );
    }
    // λ_S = 0: the defence-aware attack is the plain attack
    for k in ["pgd_linf_8/255", "pgd_l2_0.5"] {
        assert_eq!(
            zero[format!("adaptive_{k}_acc")],
            plain[format!("{k}_acc")],
            "{k}: {zero}"
        );
        assert_eq!(
            zero[format!("adaptive_{k}_reversed_acc")],
            plain[format!("{k}_acc")]
        );
    }
    let adapt = metrics("adapt")?;
    for k in [
        "adaptive_pgd_linf_8/255_acc",
        "adaptive_pgd_linf_8/255_reversed_acc",
        "adaptive_pgd_l2_0.5_acc",
    ] {
        let v = adapt[k].as_f64().ok_or(k)?;
        assert!((0.0..=1.0).contains(&v), "{k}: {adapt}");
    }
    assert!(
        adapt["defense"]["ssl_loss"]["adaptive_pgd_linf_8/255"]["before"].is_number(),
        "{adapt}"
    );
    let rev = metrics("rev")?;
    for k in ["clean", "pgd_linf_8/255", "pgd_l2_0.5"] {
        let acc = rev[format!("{k}_reversed_acc")].as_f64().ok_or("acc")?;
        assert!((0.0..=1.0).contains(&acc), "{rev}");
        let l = &rev["defense"]["ssl_loss"][k];
        assert!(l["before"].as_f64().ok_or("before")? > 0.0, "{rev}");
        assert!(l["after"].as_f64().ok_or("after")? > 0.0, "{rev}");
    }
    // the undefended numbers are untouched by the defence
    assert_eq!(rev["clean_acc"], plain["clean_acc"]);
    assert_eq!(rev["pgd_linf_8/255_acc"], plain["pgd_linf_8/255_acc"]);
    assert_eq!(rev["defense"]["config"]["steps"], json!(4));
    let dlsp = metrics("dlsp")?;
    assert_eq!(dlsp["defense"]["config"]["norm"], json!("attack"));
    assert!(dlsp["pgd_l2_0.5_reversed_acc"].is_number(), "{dlsp}");
    let noise = metrics("noise")?;
    assert!(noise["pgd_linf_8/255_noised_acc"].is_number(), "{noise}");
    assert!(
        noise["defense"]["ssl_loss"]
            .as_object()
            .ok_or("losses")?
            .is_empty()
    );
    assert_eq!(
        noise["defense"]["config"],
        json!({"method": "random", "eps": 8.0 / 255.0, "batch_size": 512})
    );
    Ok(())
}

#[test]
fn an_interrupted_defence_evaluation_resumes_through_the_engine() -> TestResult {
    use pipe_engine::exec::{Event, Observer};
    use pipe_engine::plan::Plan;
    use std::sync::atomic::{AtomicBool, Ordering};
    /// Cancels the run when node `ev` starts its reversal.
    struct CancelAtReversal<'a>(&'a AtomicBool);
    impl Observer for CancelAtReversal<'_> {
        fn event(&mut self, plan: &Plan, event: &Event) {
            if let Event::Stage(i, pipe_engine::StageEvent::Progress { message, .. }) = event
                && plan.graph.nodes[*i].id == "ev"
                && message.starts_with("defence (")
            {
                self.0.store(true, Ordering::Relaxed);
            }
        }
    }
    let setup = |name: &str| -> std::result::Result<_, Box<dyn std::error::Error + Send + Sync>> {
        let tmp = crate::data::testutil::TempDir::new(name);
        let fixture = tmp.path().join("fixture");
        std::fs::create_dir_all(&fixture)?;
        testutil::write_classifier(&fixture, None)?;
        let yaml = format!(
            "{}  ev:
    kind: evaluate
    inputs: {{model: clf, dataset: data, ssl_head: head}}
    params: {{attacks: [{{eps: 8/255, steps: 3}}], test_subset: 8, batch_size: 8,
              defense: {{steps: 10, batch_size: 4, adaptive_lambda: 10}}}}
",
            defense_base(&fixture)
        );
        Ok((tmp, yaml))
    };
    let metrics = |plan: &Plan,
                   store: &pipe_cache::Store,
                   file: &str|
     -> std::result::Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
        let node = plan
            .graph
            .nodes
            .iter()
            .find(|n| n.id == "ev")
            .ok_or("node")?;
        let e = store.get(node.key.key())?.ok_or("committed")?;
        Ok(std::fs::read(e.file(file)?)?)
    };
    let without_seconds = |bytes: &[u8]| -> std::result::Result<Value, serde_json::Error> {
        let mut v: Value = serde_json::from_slice(bytes)?;
        if let Value::Object(m) = &mut v {
            m.remove("seconds");
        }
        Ok(v)
    };
    // uninterrupted
    let (fresh_dir, yaml) = setup("evaluate-resume-fresh")?;
    let (plan, store, s) = run_with_fixture(fresh_dir.path(), &yaml, false)?;
    assert!(!s.interrupted);
    let fresh = without_seconds(&metrics(&plan, &store, "metrics.json")?)?;
    // interrupted in its reversal, then run again
    let (dir, yaml) = setup("evaluate-resume")?;
    let cancel = AtomicBool::new(false);
    let (plan, _, s) = run_observed(
        dir.path(),
        &yaml,
        false,
        &cancel,
        &mut CancelAtReversal(&cancel),
    )?;
    assert!(s.interrupted, "the run was not interrupted");
    let ev = plan
        .graph
        .nodes
        .iter()
        .position(|n| n.id == "ev")
        .ok_or("ev")?;
    assert_eq!(s.results[ev].outcome, pipe_engine::exec::Outcome::Skipped);
    let (plan, store, s) = run_with_fixture(dir.path(), &yaml, false)?;
    assert_eq!(s.results[ev].outcome, pipe_engine::exec::Outcome::Ran);
    let log = String::from_utf8(metrics(&plan, &store, "log.txt")?)?;
    assert!(
        log.contains("evaluation: 4 of 4 batches replayed"),
        "the evaluation pass is not replayed:\n{log}"
    );
    assert!(log.contains("batches in all replayed"), "{log}");
    assert_eq!(
        without_seconds(&metrics(&plan, &store, "metrics.json")?)?,
        fresh,
        "a resumed evaluation differs from an uninterrupted one"
    );
    Ok(())
}
