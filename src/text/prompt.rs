//! The Qwen3-Reranker prompt and its exact token ids.
//!
//! The reference is the model card's code: it tokenizes the prefix and suffix once, tokenizes the
//! *formatted body* `<Instruct>: …\n<Query>: …\n<Document>: …` on its own (no special tokens added),
//! truncates that body to `max_length − len(prefix) − len(suffix)` tokens by keeping the first ones,
//! and concatenates `prefix_ids + body_ids + suffix_ids`. Tokenizing the three parts separately is not
//! the same as tokenizing their concatenation in general, so we follow the reference step by step.
//!
//! Document assembly (ours, mirrored in `tests/fixtures/tokenize/generate.py`): if the description has
//! more than `max_description_tokens` tokens, keep the first `max_description_tokens` of them and
//! decode them back to text (special tokens kept, lossy UTF-8 like the tokenizers library); the
//! document is then `title + ". " + description`, or just `title` when the (truncated) description is
//! empty. Bounding the description first keeps the query and title in the prompt when a long
//! description would otherwise push everything else past `max_length`.
//!
//! Speed: the body starts with the same `<Instruct>: {instruction}\n<Query>:` for every pair. For a
//! tokenizer built like Qwen's (see [`instruction_splits_cleanly`]) the ids of `head + tail` are
//! exactly `ids(head) + ids(tail)` when `tail` starts with the space after `<Query>:`, so the head is
//! encoded once and only the tail per pair; about 40% less text to tokenize for Home Depot titles.
//! For any other tokenizer the whole body is encoded, as the reference does.

use std::borrow::Cow;

use tokenizers::Tokenizer;

use super::TextError;

/// The system turn and the opening of the user turn, exactly as in the Qwen3-Reranker model card.
pub const PREFIX: &str = "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n";
/// The end of the user turn and an assistant turn with an empty thinking block: the model's next
/// token is the answer, so the last position's logits score the pair.
pub const SUFFIX: &str = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n";
/// The model card's default instruction.
pub const DEFAULT_INSTRUCTION: &str = "Given a web search query, retrieve relevant passages that answer the query";
pub const DEFAULT_MAX_LENGTH: usize = 512;
/// Qwen2/Qwen3's pre-tokenizer: the split regex, then byte-level mapping without its own regex.
const QWEN_PRE_TOKENIZER: &str = r#"{"type":"Sequence","pretokenizers":[{"type":"Split","pattern":{"Regex":"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},"behavior":"Isolated","invert":false},{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":false,"use_regex":false}]}"#;
pub const DEFAULT_MAX_DESCRIPTION_TOKENS: usize = 350;

/// Whether `ids(head + tail) == ids(head) + ids(tail)` for `head = "<Instruct>: {i}\n<Query>:"` and any
/// `tail` that starts with a space, whatever the instruction, query and document.
///
/// Why it holds for this tokenizer shape: (1) no added token contains `:` and none strips spaces, so
/// no added-token match crosses the `:`/space boundary; (2) NFC never composes a space with the
/// character before it; (3) in the split regex the piece holding the final `:` is the punctuation run
/// ` ?[^\s\p{L}\p{N}]+[\r\n]*`, which stops at a space, no alternative looks behind, and the
/// only lookahead (`\s+(?!\S)`) sees one character past a whitespace run, which in the head is
/// never its last character; (4) byte-level mapping and BPE then work piece by piece.
/// Checked against the loaded tokenizer's own configuration, not assumed from its name.
pub fn instruction_splits_cleanly(tokenizer: &Tokenizer) -> bool {
    let normalizer_ok = match tokenizer.get_normalizer() {
        None => true,
        Some(n) => serde_json::to_value(n).ok() == Some(serde_json::json!({"type": "NFC"})),
    };
    let expected: serde_json::Value = serde_json::from_str(QWEN_PRE_TOKENIZER).expect("constant JSON");
    let pre_tokenizer_ok = tokenizer.get_pre_tokenizer().and_then(|p| serde_json::to_value(p).ok()) == Some(expected);
    let added_ok =
        tokenizer.get_added_tokens_decoder().values().all(|t| !t.content.contains(':') && !t.lstrip && !t.rstrip);
    normalizer_ok && pre_tokenizer_ok && added_ok
}

/// The user-turn body of the prompt, as the model card's `format_instruction` builds it.
pub fn format_body(instruction: &str, query: &str, document: &str) -> String {
    let mut s = String::with_capacity(34 + instruction.len() + query.len() + document.len());
    s.push_str("<Instruct>: ");
    s.push_str(instruction);
    s.push_str("\n<Query>: ");
    s.push_str(query);
    s.push_str("\n<Document>: ");
    s.push_str(document);
    s
}

/// `title. description`, or the title alone when there is no description.
pub fn join_document(title: &str, description: &str) -> String {
    if description.is_empty() {
        title.to_string()
    } else {
        let mut s = String::with_capacity(title.len() + 2 + description.len());
        s.push_str(title);
        s.push_str(". ");
        s.push_str(description);
        s
    }
}

/// The token ids whose logits the reranker head compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct YesNoIds {
    pub yes: u32,
    pub no: u32,
}

/// `yes` and `no` as single tokens of this tokenizer (9693 and 2152 for Qwen3).
pub fn yes_no_ids(tokenizer: &Tokenizer) -> Result<YesNoIds, TextError> {
    let id = |t: &str| tokenizer.token_to_id(t).ok_or_else(|| TextError::MissingToken(t.to_string()));
    Ok(YesNoIds { yes: id("yes")?, no: id("no")? })
}

/// How prompts are built; the tokenize stage's parameters minus the tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptConfig {
    pub instruction: String,
    /// Cap on the whole sequence, prefix and suffix included.
    pub max_length: usize,
    /// Cap on the description before it joins the document; 0 drops descriptions entirely.
    pub max_description_tokens: usize,
}

impl Default for PromptConfig {
    fn default() -> Self {
        PromptConfig {
            instruction: DEFAULT_INSTRUCTION.to_string(),
            max_length: DEFAULT_MAX_LENGTH,
            max_description_tokens: DEFAULT_MAX_DESCRIPTION_TOKENS,
        }
    }
}

/// One prompt's ids and what had to be cut to fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// The description was longer than `max_description_tokens`.
    pub description_truncated: bool,
    /// The body was longer than the budget `max_length` leaves and lost its tail.
    pub body_truncated: bool,
}

/// A tokenizer plus the prompt's fixed parts, encoded once. Cheap to share across threads.
#[derive(Clone)]
pub struct PromptEncoder {
    tokenizer: Tokenizer,
    config: PromptConfig,
    prefix_ids: Vec<u32>,
    suffix_ids: Vec<u32>,
    yes_no: YesNoIds,
    /// Ids of `<Instruct>: {instruction}\n<Query>:` when [`instruction_splits_cleanly`] holds.
    head_ids: Option<Vec<u32>>,
}

impl PromptEncoder {
    /// Fails when `max_length` leaves no room for a body or when `yes`/`no` are not single tokens.
    pub fn new(tokenizer: Tokenizer, config: PromptConfig) -> Result<Self, TextError> {
        let mut tokenizer = tokenizer;
        // A tokenizer.json may carry its own truncation or padding; the reference applies neither
        // outside the explicit body budget.
        tokenizer.with_truncation(None).map_err(TextError::tok)?.with_padding(None);
        let prefix_ids = encode_raw(&tokenizer, PREFIX)?;
        let suffix_ids = encode_raw(&tokenizer, SUFFIX)?;
        let fixed = prefix_ids.len() + suffix_ids.len();
        if config.max_length <= fixed {
            return Err(TextError::MaxLength { max_length: config.max_length, fixed });
        }
        let yes_no = yes_no_ids(&tokenizer)?;
        let head_ids = if instruction_splits_cleanly(&tokenizer) {
            Some(encode_raw(&tokenizer, &body_head(&config.instruction))?)
        } else {
            None
        };
        Ok(PromptEncoder { tokenizer, config, prefix_ids, suffix_ids, yes_no, head_ids })
    }

    /// Encode every body whole, as the reference does, even where the instruction could be reused.
    /// For benchmarks and for tests that the shortcut changes nothing.
    pub fn without_shortcut(mut self) -> Self {
        self.head_ids = None;
        self
    }
    /// Whether the instruction head is encoded once and reused (see the module docs).
    pub fn uses_shortcut(&self) -> bool {
        self.head_ids.is_some()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn config(&self) -> &PromptConfig {
        &self.config
    }
    pub fn prefix_ids(&self) -> &[u32] {
        &self.prefix_ids
    }
    pub fn suffix_ids(&self) -> &[u32] {
        &self.suffix_ids
    }
    pub fn yes_no(&self) -> YesNoIds {
        self.yes_no
    }
    /// How many body tokens fit: `max_length − len(prefix) − len(suffix)`.
    pub fn body_budget(&self) -> usize {
        self.config.max_length - self.prefix_ids.len() - self.suffix_ids.len()
    }

    /// The description cut to `max_description_tokens` tokens (see the module docs); borrowed when
    /// nothing had to be cut.
    pub fn truncate_description<'a>(&self, description: &'a str) -> Result<(Cow<'a, str>, bool), TextError> {
        let max = self.config.max_description_tokens;
        if description.is_empty() {
            return Ok((Cow::Borrowed(description), false));
        }
        if max == 0 {
            return Ok((Cow::Borrowed(""), true));
        }
        let ids = encode_raw(&self.tokenizer, description)?;
        if ids.len() <= max {
            return Ok((Cow::Borrowed(description), false));
        }
        let text = self.tokenizer.decode(&ids[..max], false).map_err(TextError::tok)?;
        Ok((Cow::Owned(text), true))
    }

    /// The document for a catalogue pair: title plus the description cut to its token budget.
    pub fn document(&self, title: &str, description: &str) -> Result<(String, bool), TextError> {
        let (desc, cut) = self.truncate_description(description)?;
        Ok((join_document(title, &desc), cut))
    }

    /// Prompt ids for a catalogue pair (query, product title, product description).
    pub fn encode_pair(&self, query: &str, title: &str, description: &str) -> Result<Encoded, TextError> {
        let (document, description_truncated) = self.document(title, description)?;
        let mut e = self.encode_document(query, &document)?;
        e.description_truncated = description_truncated;
        Ok(e)
    }

    /// Prompt ids for a free-form document (`pipe rerank`): only the body budget applies.
    pub fn encode_document(&self, query: &str, document: &str) -> Result<Encoded, TextError> {
        let budget = self.body_budget();
        let (head, tail): (&[u32], Vec<u32>) = match &self.head_ids {
            Some(head) => (head, encode_raw(&self.tokenizer, &body_tail(query, document))?),
            None => (&[], encode_raw(&self.tokenizer, &format_body(&self.config.instruction, query, document))?),
        };
        let body_len = head.len() + tail.len();
        let kept_head = head.len().min(budget);
        let kept_tail = tail.len().min(budget - kept_head);
        let mut ids = Vec::with_capacity(self.prefix_ids.len() + kept_head + kept_tail + self.suffix_ids.len());
        ids.extend_from_slice(&self.prefix_ids);
        ids.extend_from_slice(&head[..kept_head]);
        ids.extend_from_slice(&tail[..kept_tail]);
        ids.extend_from_slice(&self.suffix_ids);
        Ok(Encoded { ids, description_truncated: false, body_truncated: body_len > budget })
    }
}

/// `<Instruct>: {instruction}\n<Query>:`: the part of the body shared by every pair.
fn body_head(instruction: &str) -> String {
    format!("<Instruct>: {instruction}\n<Query>:")
}

/// The rest of the body: [`body_head`] + this == [`format_body`].
fn body_tail(query: &str, document: &str) -> String {
    let mut s = String::with_capacity(14 + query.len() + document.len());
    s.push(' ');
    s.push_str(query);
    s.push_str("\n<Document>: ");
    s.push_str(document);
    s
}

/// Ids of `text` with no special tokens added and no offsets computed (we never need them).
fn encode_raw(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, TextError> {
    let enc = tokenizer.encode_fast(text, false).map_err(TextError::tok)?;
    Ok(enc.get_ids().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::tokenizer::builtin_qwen3;

    const QWEN3_SUFFIX: [u32; 9] = [151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271];
    const QWEN3_PREFIX_LEN: usize = 39;

    fn encoder(max_length: usize, max_description_tokens: usize) -> PromptEncoder {
        PromptEncoder::new(
            builtin_qwen3().unwrap(),
            PromptConfig { max_length, max_description_tokens, ..PromptConfig::default() },
        )
        .unwrap()
    }

    #[test]
    fn body_text_is_the_model_card_format() {
        assert_eq!(
            format_body("Find it", "angle bracket", "Simpson Strong-Tie 12-Gauge Angle"),
            "<Instruct>: Find it\n<Query>: angle bracket\n<Document>: Simpson Strong-Tie 12-Gauge Angle"
        );
        assert_eq!(join_document("Drill", ""), "Drill");
        assert_eq!(join_document("Drill", "Cordless."), "Drill. Cordless.");
    }

    #[test]
    fn fixed_parts_have_the_reference_ids() {
        let e = encoder(512, 350);
        assert_eq!(e.suffix_ids(), QWEN3_SUFFIX);
        assert_eq!(e.prefix_ids().len(), QWEN3_PREFIX_LEN);
        assert_eq!(e.prefix_ids()[0], 151644); // <|im_start|>
        assert_eq!(&e.prefix_ids()[e.prefix_ids().len() - 3..], [151644, 872, 198]); // <|im_start|>user\n
        assert_eq!(e.yes_no(), YesNoIds { yes: 9693, no: 2152 });
        assert_eq!(e.body_budget(), 512 - 39 - 9);
    }

    #[test]
    fn empty_description_gives_the_title_alone() {
        let e = encoder(512, 350);
        let with_empty = e.encode_pair("angle bracket", "Simpson Angle", "").unwrap();
        let direct = e.encode_document("angle bracket", "Simpson Angle").unwrap();
        assert_eq!(with_empty, direct);
        assert!(!with_empty.description_truncated && !with_empty.body_truncated);
        // And the document really is in there: decoding the body gives the formatted text back.
        let body = &with_empty.ids[QWEN3_PREFIX_LEN..with_empty.ids.len() - 9];
        assert_eq!(
            e.tokenizer().decode(body, false).unwrap(),
            format_body(DEFAULT_INSTRUCTION, "angle bracket", "Simpson Angle")
        );
    }

    #[test]
    fn long_description_is_cut_to_its_token_budget() {
        let e = encoder(512, 5);
        let desc = "Not only do angles make joints stronger, they also provide more consistent corners.";
        let (doc, cut) = e.document("Simpson Angle", desc).unwrap();
        assert!(cut);
        let kept = doc.strip_prefix("Simpson Angle. ").unwrap();
        assert!(desc.starts_with(kept), "{kept:?} is not a prefix of the description");
        assert_eq!(e.tokenizer().encode(kept, false).unwrap().get_ids().len(), 5);
        // A description within budget is kept verbatim.
        let (doc, cut) = encoder(512, 350).document("Simpson Angle", desc).unwrap();
        assert!(!cut);
        assert_eq!(doc, format!("Simpson Angle. {desc}"));
        // Zero drops the description.
        let (doc, cut) = encoder(512, 0).document("Simpson Angle", desc).unwrap();
        assert!(cut);
        assert_eq!(doc, "Simpson Angle");
    }

    #[test]
    fn body_is_truncated_but_prefix_and_suffix_survive() {
        let max_length = 100;
        let e = encoder(max_length, 350);
        let long = "very ".repeat(200);
        let out = e.encode_pair("drill", "Cordless Drill", &long).unwrap();
        assert!(out.body_truncated);
        assert_eq!(out.ids.len(), max_length);
        assert_eq!(&out.ids[..QWEN3_PREFIX_LEN], e.prefix_ids());
        assert_eq!(&out.ids[max_length - 9..], QWEN3_SUFFIX);
        // The kept body is the head of the full body's ids.
        let full = e
            .tokenizer()
            .encode(format_body(DEFAULT_INSTRUCTION, "drill", &e.document("Cordless Drill", &long).unwrap().0), false)
            .unwrap();
        assert_eq!(&out.ids[QWEN3_PREFIX_LEN..max_length - 9], &full.get_ids()[..max_length - 48]);
        // A short pair is not truncated and is shorter than the cap.
        let short = e.encode_pair("drill", "Drill", "").unwrap();
        assert!(!short.body_truncated && short.ids.len() < max_length);
    }

    #[test]
    fn max_length_must_leave_room_for_a_body() {
        let cfg = PromptConfig { max_length: 48, ..PromptConfig::default() };
        match PromptEncoder::new(builtin_qwen3().unwrap(), cfg) {
            Err(TextError::MaxLength { max_length: 48, fixed: 48 }) => {}
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("max_length 48 accepted"),
        }
        assert_eq!(encoder(49, 350).body_budget(), 1);
    }

    /// `tests/fixtures/tokenize/expected.json`: ids made by the Python `tokenizers` library and by the
    /// model card's transformers code (see generate.py there) for real Home Depot pairs.
    #[test]
    fn ids_match_the_python_reference_on_real_pairs() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenize/expected.json");
        let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let u32s = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
        };
        assert_eq!(fixture["prefix"], PREFIX);
        assert_eq!(fixture["suffix"], SUFFIX);
        assert_eq!(u32s(&fixture["suffix_ids"]), QWEN3_SUFFIX);
        let tokenizer = builtin_qwen3().unwrap();
        let yes_no = yes_no_ids(&tokenizer).unwrap();
        assert_eq!((yes_no.yes, yes_no.no), (9693, 2152));
        assert_eq!(fixture["yes_id"], yes_no.yes);
        assert_eq!(fixture["no_id"], yes_no.no);

        let cases = fixture["cases"].as_array().unwrap();
        assert!(cases.len() >= 20, "only {} cases", cases.len());
        let (mut desc_cuts, mut body_cuts) = (0, 0);
        for c in cases {
            let name = c["name"].as_str().unwrap();
            let s = |k: &str| c[k].as_str().unwrap();
            let config = PromptConfig {
                instruction: s("instruction").to_string(),
                max_length: c["max_length"].as_u64().unwrap() as usize,
                max_description_tokens: c["max_description_tokens"].as_u64().unwrap() as usize,
            };
            let e = PromptEncoder::new(tokenizer.clone(), config.clone()).unwrap();
            assert!(e.uses_shortcut());
            let plain = e.clone().without_shortcut();
            assert_eq!(e.prefix_ids(), u32s(&fixture["prefix_ids"]));
            let (document, _) = e.document(s("title"), s("description")).unwrap();
            assert_eq!(document, s("document"), "{name}: document");
            let got = e.encode_pair(s("query"), s("title"), s("description")).unwrap();
            let want = u32s(&c["ids"]);
            assert_eq!(got.ids, want, "{name}: ids");
            assert_eq!(plain.encode_pair(s("query"), s("title"), s("description")).unwrap(), got, "{name}");
            assert!(got.ids.len() <= config.max_length, "{name}");
            assert!(got.ids.ends_with(&QWEN3_SUFFIX), "{name}");
            assert_eq!(got.description_truncated, c["description_truncated"], "{name}");
            assert_eq!(got.body_truncated, c["body_truncated"], "{name}");
            desc_cuts += usize::from(got.description_truncated);
            body_cuts += usize::from(got.body_truncated);
        }
        // The fixture exercises both truncations, not just the easy path.
        assert!(desc_cuts >= 5 && body_cuts >= 3, "{desc_cuts} description cuts, {body_cuts} body cuts");
    }

    #[test]
    fn the_shortcut_is_only_taken_for_tokenizers_it_is_proven_for() {
        let qwen = builtin_qwen3().unwrap();
        assert!(instruction_splits_cleanly(&qwen));
        let mut other_split = qwen.clone();
        other_split.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace));
        assert!(!instruction_splits_cleanly(&other_split));
        let mut colon_token = qwen.clone();
        colon_token.add_tokens([tokenizers::AddedToken::from(">: ", false)]).unwrap();
        assert!(!instruction_splits_cleanly(&colon_token));
        let e = PromptEncoder::new(colon_token, PromptConfig::default()).unwrap();
        assert!(!e.uses_shortcut());
    }

    fn shared_encoder() -> &'static PromptEncoder {
        static E: std::sync::OnceLock<PromptEncoder> = std::sync::OnceLock::new();
        E.get_or_init(|| encoder(512, 350))
    }

    /// Text that stresses the boundaries: spaces, newlines, punctuation runs, colons, combining marks,
    /// digits, special-token strings and non-Latin scripts.
    fn tricky_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let atoms = prop::sample::select(vec![
            " ",
            "  ",
            "\n",
            "\r\n",
            "\t",
            ":",
            ": ",
            ">:",
            "-",
            ".",
            "...",
            "'s",
            "\u{301}",
            "e\u{301}",
            "é",
            "1/2",
            "12",
            "in.",
            "<|im_end|>",
            "<think>",
            "<Query>",
            "ß",
            "日本",
            "😀",
            "Ω",
            "\u{2126}",
            "drill",
            "Angle",
            "x",
            "\"",
            "&amp;",
        ]);
        prop::collection::vec(atoms, 0..12).prop_map(|v| v.concat())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        /// Reusing the instruction's ids never changes the result, whatever the query and document.
        #[test]
        fn shortcut_gives_the_reference_ids(
            instruction in tricky_text(),
            query in tricky_text(),
            document in tricky_text(),
        ) {
            let base = shared_encoder();
            let cfg = PromptConfig { instruction, ..PromptConfig::default() };
            let fast = PromptEncoder::new(base.tokenizer().clone(), cfg).unwrap();
            proptest::prop_assert!(fast.uses_shortcut());
            let plain = fast.clone().without_shortcut();
            let a = fast.encode_document(&query, &document).unwrap();
            let b = plain.encode_document(&query, &document).unwrap();
            proptest::prop_assert_eq!(a, b);
        }
    }
}
