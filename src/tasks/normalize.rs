//! The EvalAI answer normaliser of the VQA/TextVQA evaluation (`EvalAIAnswerProcessor` in
//! `m4c_evaluator.py`), reproduced rule by rule, quirks included:
//!
//! 1. lower-case; delete `,` and `?`; `'s` → ` 's`; strip; newlines and tabs → spaces; strip.
//! 2. for each punctuation mark `p` of `; / [ ] " { } ( ) = + \ _ - > < @ ` , ? !`: if the text
//!    (as it was before step 2) contains `p ` or ` p`, or a digit–commas–digit run, delete `p`,
//!    else replace it by a space;
//! 3. delete `.` not followed by a digit — at most 32 times (the Python code passes `re.UNICODE`
//!    (= 32) as `re.sub`'s `count` argument);
//! 4. split on whitespace, map `none`/`zero`→`0`, `one`…`ten`→`1`…`10`, drop `a`/`an`/`the`,
//!    expand the contraction table, join with single spaces.
//!
//! Plus the soft VQA accuracy of the same evaluator.

use std::collections::HashMap;

const PUNCTUATIONS: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

const NUMBERS: [(&str, &str); 12] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

const ARTICLES: [&str; 3] = ["a", "an", "the"];

/// The VQA evaluation's contraction table (keys with capitals never match after lower-casing;
/// kept as published).
const CONTRACTIONS: &[(&str, &str)] = &[
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("Id've", "I'd've"),
    ("I'dve", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

fn is_digit(c: char) -> bool {
    c.is_ascii_digit()
}

/// Python's `str.strip()`/`split()` whitespace: Unicode White_Space plus the information
/// separators U+001C–U+001F, which Python's `str.isspace()` counts (bidi class B or S) and
/// Rust's `char::is_whitespace` does not.
pub fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()`: `text` without leading and trailing [`is_space`] characters.
pub fn python_strip(text: &str) -> &str {
    text.trim_matches(is_space)
}

/// Whether `text` contains a digit, one or more commas, and a digit (`(?<=\d)(\,)+(?=\d)`).
fn has_digit_comma_digit(text: &[char]) -> bool {
    let mut i = 1;
    while i < text.len() {
        if text[i] == ',' && is_digit(text[i - 1]) {
            let mut j = i;
            while j < text.len() && text[j] == ',' {
                j += 1;
            }
            if j < text.len() && is_digit(text[j]) {
                return true;
            }
            i = j;
        } else {
            i += 1;
        }
    }
    false
}

fn process_punctuation(in_text: &str) -> String {
    let chars: Vec<char> = in_text.chars().collect();
    let comma_run = has_digit_comma_digit(&chars);
    let mut out = in_text.to_string();
    for p in PUNCTUATIONS {
        let before = format!("{p} ");
        let after = format!(" {p}");
        if in_text.contains(&before) || in_text.contains(&after) || comma_run {
            out = out.replace(p, "");
        } else {
            out = out.replace(p, " ");
        }
    }
    // `(?!<=\d)(\.)(?!\d)`: the first lookahead never matches at a '.', so this removes every
    // '.' not followed by a digit, at most 32 times.
    let chars: Vec<char> = out.chars().collect();
    let mut res = String::with_capacity(out.len());
    let mut removed = 0;
    for (i, &c) in chars.iter().enumerate() {
        if c == '.' && removed < 32 && !chars.get(i + 1).is_some_and(|&n| is_digit(n)) {
            removed += 1;
            continue;
        }
        res.push(c);
    }
    res
}

fn contraction(word: &str) -> Option<&'static str> {
    CONTRACTIONS
        .iter()
        .find(|(k, _)| *k == word)
        .map(|(_, v)| *v)
}

fn process_digit_article(in_text: &str) -> String {
    let lowered = in_text.to_lowercase();
    let mut words: Vec<&str> = Vec::new();
    for word in lowered.split(is_space).filter(|w| !w.is_empty()) {
        let word = NUMBERS
            .iter()
            .find(|(k, _)| *k == word)
            .map_or(word, |(_, v)| *v);
        if !ARTICLES.contains(&word) {
            words.push(word);
        }
    }
    let words: Vec<&str> = words
        .into_iter()
        .map(|w| contraction(w).unwrap_or(w))
        .collect();
    words.join(" ")
}

/// Normalise an answer as the EvalAI/TextVQA evaluator does.
pub fn normalize_answer(item: &str) -> String {
    let item = item
        .to_lowercase()
        .replace([',', '?'], "")
        .replace("'s", " 's");
    let item = item.trim_matches(is_space);
    let item = item.replace(['\n', '\t'], " ");
    let item = item.trim_matches(is_space);
    let item = process_punctuation(item);
    process_digit_article(&item)
}

/// The soft VQA accuracy of every distinct (already normalised) ground-truth answer: for each of
/// the N human answers left out in turn, `min(1, matches among the others / 3)`, averaged.
pub fn soft_scores(gt_normalised: &[String]) -> HashMap<String, f64> {
    let mut scores = HashMap::new();
    let n = gt_normalised.len();
    if n == 0 {
        return scores;
    }
    for unique in gt_normalised {
        if scores.contains_key(unique) {
            continue;
        }
        let total_matches = gt_normalised.iter().filter(|a| *a == unique).count();
        let mut sum = 0.0;
        for left_out in gt_normalised {
            let matches = total_matches - usize::from(left_out == unique);
            sum += (matches as f64 / 3.0).min(1.0);
        }
        scores.insert(unique.clone(), sum / n as f64);
    }
    scores
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn python_strip_removes_what_str_strip_removes() {
        assert_eq!(python_strip("\u{1c} yes\t\u{1f}\n"), "yes");
        assert_eq!(python_strip("\u{a0}a b\u{3000}"), "a b");
        assert_eq!(
            python_strip("\u{200b}x"),
            "\u{200b}x",
            "not whitespace in Python either"
        );
    }

    #[test]
    fn python_whitespace_includes_the_information_separators() {
        // Python's str.split() and strip() break at U+001C–U+001F; char::is_whitespace does not.
        assert_eq!(normalize_answer("red\u{1f}car"), "red car");
        assert_eq!(normalize_answer("\u{1c}red\u{1e}"), "red");
        assert_eq!(normalize_answer("red\u{a0}car"), "red car");
    }

    #[test]
    fn rules_one_by_one() {
        // 1: lower, commas and question marks deleted, 's split.
        assert_eq!(normalize_answer("  Bob's Car? "), "bob 's car");
        // 4: numbers, articles.
        assert_eq!(normalize_answer("Two"), "2");
        assert_eq!(normalize_answer("none"), "0");
        assert_eq!(normalize_answer("the dog"), "dog");
        assert_eq!(normalize_answer("An Apple"), "apple");
        // 4: contractions.
        assert_eq!(normalize_answer("dont"), "don't");
        assert_eq!(normalize_answer("isnt it"), "isn't it");
        // 2: punctuation next to a space is deleted, inside a word replaced by a space.
        assert_eq!(normalize_answer("coca-cola"), "coca cola");
        assert_eq!(normalize_answer("yes - no"), "yes no");
        assert_eq!(normalize_answer("(hello)"), "hello");
        assert_eq!(normalize_answer("a/b"), "b"); // "a b" then the article "a" is dropped
                                                  // 3: periods not followed by a digit are removed; decimal points stay.
        assert_eq!(normalize_answer("3.5"), "3.5");
        assert_eq!(normalize_answer("Yes."), "yes");
        assert_eq!(normalize_answer("u.s.a."), "usa");
        // whitespace collapse.
        assert_eq!(normalize_answer("a\tbig\ncat"), "big cat");
        assert_eq!(normalize_answer(""), "");
    }

    #[test]
    fn period_removal_stops_after_32() {
        let s = ".".repeat(40) + "x";
        assert_eq!(normalize_answer(&s), format!("{}x", ".".repeat(8)));
    }

    #[test]
    fn comma_digit_rule_uses_the_text_before_punctuation() {
        // Commas are already gone after step 1, so the digit-comma rule never fires there;
        // a '-' inside a word becomes a space.
        assert_eq!(normalize_answer("1,000-2"), "1000 2");
        assert!(has_digit_comma_digit(&"1,,2".chars().collect::<Vec<_>>()));
        assert!(!has_digit_comma_digit(&"1, 2".chars().collect::<Vec<_>>()));
        assert_eq!(process_punctuation("1,2 a-b"), "12 ab");
    }

    #[test]
    fn soft_accuracy_leave_one_out() {
        let gt: Vec<String> = ["a", "a", "a", "b", "b", "c", "c", "c", "c", "d"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let s = soft_scores(&gt);
        // "a" appears 3 times: leaving out one of them leaves 2 → 2/3 (3 subsets), else 1 (7).
        assert!((s["a"] - (3.0 * 2.0 / 3.0 + 7.0) / 10.0).abs() < 1e-12);
        assert!((s["b"] - (2.0 * 1.0 / 3.0 + 8.0 * 2.0 / 3.0) / 10.0).abs() < 1e-12);
        assert!((s["c"] - 1.0).abs() < 1e-12);
        assert!((s["d"] - 0.9 * (1.0 / 3.0)).abs() < 1e-12);
        assert!(!s.contains_key("e"));
    }

    proptest! {
        #[test]
        fn normalised_text_is_clean(s in "[ -~\t\n]{0,30}") {
            let n = normalize_answer(&s);
            prop_assert!(!n.starts_with(' ') && !n.ends_with(' '));
            prop_assert!(!n.contains("  "));
            prop_assert!(!n.chars().any(|c| c.is_ascii_uppercase() || c == ',' || c == '?' || c == '\t' || c == '\n'));
            for w in n.split(' ') {
                prop_assert!(!ARTICLES.contains(&w));
                prop_assert!(!NUMBERS.iter().any(|(k, _)| *k == w));
            }
            let chars: Vec<char> = n.chars().collect();
            for (i, c) in chars.iter().enumerate() {
                if *c == '.' {
                    prop_assert!(chars.get(i + 1).is_some_and(|c| c.is_ascii_digit()), "{n}");
                }
            }
        }

        #[test]
        fn normalising_twice_changes_nothing_for_word_answers(s in "[A-Ra-rT-Zt-z0-9 ]{0,20}") {
            let once = normalize_answer(&s);
            prop_assert_eq!(normalize_answer(&once), once.clone());
        }

        #[test]
        fn soft_scores_are_probabilities(v in proptest::collection::vec("[abc]", 1..12)) {
            let s = soft_scores(&v);
            for (_, x) in s {
                prop_assert!((0.0..=1.0).contains(&x));
            }
        }
    }
}
