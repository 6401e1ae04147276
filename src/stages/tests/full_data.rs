//! The whole Kaggle `train.csv` (74,067 rows) through load → normalize → split, when ../shared has it.

use std::collections::HashMap;

use super::{params, upstream, Harness};
use crate::stages::load::Load;
use crate::stages::normalize::Normalize;
use crate::stages::split::{self, Split};
use crate::stages::table;

#[test]
fn full_kaggle_data_loads_and_splits_without_query_leakage() {
    let Some(p) = super::full_data_load_params() else { return };
    let h = Harness::new();
    let (res, load_out) = h.run(&Load, "load", &p, &[]);
    let stats = res.unwrap().stats;
    // Figures from ../shared/data/home_depot/SOURCES.md.
    assert_eq!(stats["rows"], 74_067);
    assert_eq!(stats["distinct_queries"], 11_795);
    assert_eq!(stats["distinct_products"], 54_667);
    assert_eq!(stats["rows_with_description"], 2_645);

    let (res, norm_out) = h.run(&Normalize, "normalize", &params(&Normalize, &[]), &[upstream("load", &load_out)]);
    res.unwrap();
    let (res, out) = h.run(&Split, "split", &params(&Split, &[]), &[upstream("normalize", &norm_out)]);
    let stats = res.unwrap().stats;

    let mut home: HashMap<String, usize> = HashMap::new();
    let mut sizes = [0usize; 3];
    for (i, name) in split::SPLITS.iter().enumerate() {
        let rows = table::read_labeled(&out.join(format!("{name}.csv"))).unwrap();
        sizes[i] = rows.len();
        for r in rows {
            let prev = *home.entry(r.record.query.clone()).or_insert(i);
            assert_eq!(prev, i, "query `{}` is in {} and {name}", r.record.query, split::SPLITS[prev]);
        }
    }
    assert_eq!(sizes.iter().sum::<usize>(), 74_067);
    for (i, want) in [0.70, 0.15, 0.15].into_iter().enumerate() {
        let got = sizes[i] as f64 / 74_067.0;
        assert!((got - want).abs() < 0.005, "{}: share {got}, want {want}", split::SPLITS[i]);
    }
    assert_eq!(stats["queries"].as_u64().unwrap() as usize, home.len());
    // Relevance ≥ 2.33 holds for 16,060 + 19 + 15,202 + 11 + 19,125 = 50,417 rows (SOURCES.md
    // histogram); stratification keeps each split's positive rate near the overall one.
    let positives: u64 = split::SPLITS.iter().map(|n| stats[*n]["positives"].as_u64().unwrap()).sum();
    assert_eq!(positives, 50_417);
    for name in split::SPLITS {
        let rate = stats[name]["positive_rate"].as_f64().unwrap();
        assert!((rate - 50_417.0 / 74_067.0).abs() < 0.02, "{name}: positive rate {rate}");
    }
}
