//! `normalize`: make equal text equal (Unicode form, case, whitespace) without losing meaning.
//!
//! Product search text is full of measurements and model numbers (`1/2 in. x 10 ft.`, `#8`,
//! `2-1/2`), so no punctuation or symbol is ever removed: a tokenizer sees the same characters a
//! rater saw, only in one canonical spelling.

use std::borrow::Cow;

use serde::Deserialize;
use unicode_normalization::{is_nfc_quick, is_nfkc_quick, IsNormalized, UnicodeNormalization};

use super::table::{self, TableReader, TableWriter};
use crate::engine::{
    Contract, JsonMap, Need, ParamError, StageContext, StageError, StageOutput, StageParams, TypedStage,
};

pub const KIND: &str = "normalize";
/// Bump when the same input and parameters would give different text.
pub const VERSION: u32 = 1;
const DEFAULTS: &str = include_str!("../../stages/normalize.toml");
/// The `load` table in, the same columns out.
pub const CONTRACT: Contract = Contract { needs: &[Need::always(&[super::load::KIND])], writes: &[table::TABLE_FILE] };

pub struct Normalize;

/// The parameters of `stages/normalize.toml`.
#[derive(Debug, Clone, Deserialize)]
pub struct NormalizeParams {
    pub lowercase: bool,
    pub unicode: String,
}

impl StageParams for NormalizeParams {
    fn validate(&self) -> Result<(), ParamError> {
        Form::parse(&self.unicode).map(drop)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Nfc,
    Nfkc,
    None,
}

impl Form {
    fn parse(s: &str) -> Result<Form, ParamError> {
        match s {
            "nfc" => Ok(Form::Nfc),
            "nfkc" => Ok(Form::Nfkc),
            "none" => Ok(Form::None),
            other => Err(ParamError::new(
                "unicode",
                format!("unknown normalization form `{other}`; expected \"nfc\", \"nfkc\" or \"none\""),
            )),
        }
    }
}

/// The text options, resolved from the parameters.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub lowercase: bool,
    pub form: Form,
}

impl Default for Options {
    fn default() -> Self {
        Options { lowercase: true, form: Form::Nfc }
    }
}

/// One field's canonical spelling. The Unicode form is applied before lowercasing and again after
/// it (NFKC can produce capitals, `ℌ` → `H`; lowercasing can leave text outside NFC), and whitespace
/// is collapsed last because NFKC can produce spaces (`¨` → ` ̈`). That order makes the function
/// idempotent, which the property test below checks.
pub fn normalize_text<'a>(s: &'a str, opts: &Options) -> Cow<'a, str> {
    let mut out = Cow::Borrowed(s);
    apply_form(&mut out, opts.form);
    if opts.lowercase && out.chars().any(|c| c.to_lowercase().ne(std::iter::once(c))) {
        out = Cow::Owned(out.to_lowercase());
        apply_form(&mut out, opts.form);
    }
    if needs_whitespace_fix(&out) {
        let mut buf = String::with_capacity(out.len());
        for (i, word) in out.split_whitespace().enumerate() {
            if i > 0 {
                buf.push(' ');
            }
            buf.push_str(word);
        }
        out = Cow::Owned(buf);
    }
    out
}

/// Replace `text` by its normal form, allocating only when that changes it.
fn apply_form(text: &mut Cow<str>, form: Form) {
    let normalized: String = match form {
        Form::Nfc if is_nfc_quick(text.chars()) != IsNormalized::Yes => text.nfc().collect(),
        Form::Nfkc if is_nfkc_quick(text.chars()) != IsNormalized::Yes => text.nfkc().collect(),
        _ => return,
    };
    if normalized != **text {
        *text = Cow::Owned(normalized);
    }
}

/// Whether collapsing whitespace would change `s` (a cheap scan that keeps the common case
/// allocation-free).
fn needs_whitespace_fix(s: &str) -> bool {
    let mut prev_space = true; // leading whitespace counts as a run to remove
    for c in s.chars() {
        if c.is_whitespace() {
            if prev_space || c != ' ' {
                return true;
            }
            prev_space = true;
        } else {
            prev_space = false;
        }
    }
    prev_space && !s.is_empty()
}

impl TypedStage for Normalize {
    type Params = NormalizeParams;
    const KIND: &'static str = KIND;
    const VERSION: u32 = VERSION;
    const DEFAULTS: &'static str = DEFAULTS;
    const CONTRACT: Contract = CONTRACT;

    fn run(ctx: &StageContext, p: &NormalizeParams) -> Result<StageOutput, StageError> {
        let opts = Options { lowercase: p.lowercase, form: Form::parse(&p.unicode)? };
        let input = ctx.upstream_of(&[super::load::KIND])?.dir.join(table::TABLE_FILE);
        let reader = TableReader::open(&input)?;
        let mut writer = TableWriter::create(&ctx.out.join(table::TABLE_FILE), false)?;
        let (mut rows, mut query, mut title, mut description) = (0u64, 0u64, 0u64, 0u64);
        for row in reader {
            let (mut r, _) = row?;
            if rows.is_multiple_of(8192) {
                ctx.check_cancel()?;
            }
            rows += 1;
            for (field, count) in
                [(&mut r.query, &mut query), (&mut r.title, &mut title), (&mut r.description, &mut description)]
            {
                if let Cow::Owned(s) = normalize_text(field, &opts) {
                    *field = s;
                    *count += 1;
                }
            }
            writer.write(&r, None)?;
        }
        writer.finish()?;
        let mut changed = JsonMap::new();
        changed.insert("query".into(), query.into());
        changed.insert("title".into(), title.into());
        changed.insert("description".into(), description.into());
        let mut stats = JsonMap::new();
        stats.insert("rows".into(), rows.into());
        stats.insert("changed_rows".into(), changed.into());
        Ok(StageOutput { stats, ..Default::default() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn norm(s: &str) -> String {
        normalize_text(s, &Options::default()).into_owned()
    }

    #[test]
    fn examples() {
        assert_eq!(norm("  Angle   Bracket\t\n"), "angle bracket");
        assert_eq!(norm("a\u{a0}\u{2003}b"), "a b", "no-break and em spaces are whitespace");
        // NFD input (e + combining acute) becomes the composed character.
        assert_eq!(norm("Cafe\u{301} Table"), "caf\u{e9} table");
        assert_eq!(norm("\u{c5}ngstr\u{f6}m"), "\u{e5}ngstr\u{f6}m");
        // Measurements, model numbers and symbols survive untouched apart from case.
        assert_eq!(
            norm("Grip-Rite #8 x 3 in. 16\u{e5}\u{a1} Nails (5 lb.-Pack) 1/2 in. x 10 ft. $9.99 & 50%"),
            "grip-rite #8 x 3 in. 16\u{e5}\u{a1} nails (5 lb.-pack) 1/2 in. x 10 ft. $9.99 & 50%"
        );
        let keep_case = Options { lowercase: false, form: Form::Nfc };
        assert_eq!(normalize_text(" 1/2 In. X 10 Ft. ", &keep_case), "1/2 In. X 10 Ft.");
        let nfkc = Options { lowercase: true, form: Form::Nfkc };
        assert_eq!(normalize_text("\u{bd} In. \u{fb01}ber \u{210c}", &nfkc), "1\u{2044}2 in. fiber h");
        let none = Options { lowercase: false, form: Form::None };
        assert_eq!(normalize_text("e\u{301}", &none), "e\u{301}");
        // Unchanged text is not copied: the changed-row counts rely on this.
        assert!(matches!(normalize_text("angle bracket", &Options::default()), Cow::Borrowed(_)));
        assert!(matches!(normalize_text("", &Options::default()), Cow::Borrowed(_)));
    }

    fn options() -> impl Strategy<Value = Options> {
        (any::<bool>(), prop_oneof![Just(Form::Nfc), Just(Form::Nfkc), Just(Form::None)])
            .prop_map(|(lowercase, form)| Options { lowercase, form })
    }

    proptest! {
        #[test]
        fn idempotent_and_borrowed_exactly_when_unchanged(s in "\\PC{0,40}|[ \\t\\na-zA-Z\u{c0}-\u{17f}\u{300}-\u{36f}#/.x\u{a0}]{0,40}", opts in options()) {
            let once = normalize_text(&s, &opts);
            prop_assert_eq!(matches!(once, Cow::Owned(_)), once != s.as_str());
            let twice = normalize_text(&once, &opts);
            prop_assert_eq!(twice.as_ref(), once.as_ref());
            prop_assert!(!once.starts_with(char::is_whitespace) && !once.ends_with(char::is_whitespace));
            prop_assert!(!once.contains("  "));
        }

        #[test]
        fn only_whitespace_is_ever_removed(s in "\\PC{0,40}|[ \\t\\na-z#/.,()\u{a0}-\u{ff}-]{0,40}") {
            let out = normalize_text(&s, &Options { lowercase: false, form: Form::None });
            prop_assert_eq!(out.split_whitespace().collect::<String>(), s.split_whitespace().collect::<String>());
        }
    }
}
