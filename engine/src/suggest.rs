//! "Did you mean ...?" for misspelt names in a pipeline file: param fields, enum values, stage
//! kinds, stage ids, input slots, variants.
//!
//! A suggestion is made only when one candidate is clearly closest: its edit distance
//! (insertions, deletions, substitutions and swaps of two neighbours each count 1, ignoring
//! case) is at most a third of the longer name (at least 1), and no other candidate is as
//! close. A wrong guess is worse than none, so anything ambiguous suggests nothing.

/// Longest name (bytes) [`closest`] compares.
const MAX_LEN: usize = 128;

/// The candidate `word` most likely misspells, if one is clearly closest.
///
/// ```
/// use pipe_engine::suggest::closest;
/// assert_eq!(closest("atack", ["method", "attack", "alpha"]), Some("attack"));
/// assert_eq!(closest("epcohs", ["epochs", "eps"]), Some("epochs"));
/// assert_eq!(closest("zzz", ["epochs", "eps"]), None);
/// ```
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    // names are short; a long one (a pasted paragraph) is no misspelling worth the work
    if word.len() > MAX_LEN {
        return None;
    }
    let w: Vec<char> = word.to_lowercase().chars().collect();
    let mut best: Option<(usize, &'a str)> = None;
    let mut tied = false;
    for c in candidates {
        let cl: Vec<char> = c.to_lowercase().chars().collect();
        if cl == w {
            // same name but for case: the closest there can be
            return (c != word).then_some(c);
        }
        let limit = (w.len().max(cl.len()) / 3).max(1);
        if w.len().abs_diff(cl.len()) > limit || cl.len() > MAX_LEN {
            continue;
        }
        let d = distance(&w, &cl);
        if d > limit || d >= w.len().max(cl.len()) {
            continue;
        }
        match best {
            Some((b, _)) if d > b => {}
            Some((b, prev)) if d == b => tied |= prev != c,
            _ => {
                best = Some((d, c));
                tied = false;
            }
        }
    }
    best.filter(|_| !tied).map(|(_, c)| c)
}

/// `message` with ` (did you mean `x`?)` after the name a serde "unknown field" / "unknown
/// variant" error names, when [`closest`] finds one among the names it lists; otherwise the
/// message as it was.
///
/// ```
/// use pipe_engine::suggest::explain;
/// assert_eq!(
///     explain("unknown variant `fre`, expected one of `none`, `pgd`, `free`"),
///     "unknown variant `fre` (did you mean `free`?), expected one of `none`, `pgd`, `free`"
/// );
/// ```
pub fn explain(message: &str) -> String {
    for lead in ["unknown field `", "unknown variant `"] {
        let Some(start) = message.find(lead) else {
            continue;
        };
        let name_at = start + lead.len();
        let Some(len) = message[name_at..].find('`') else {
            continue;
        };
        let name = &message[name_at..name_at + len];
        let after = name_at + len + 1;
        let Some(list) = message[after..].strip_prefix(", expected ") else {
            continue;
        };
        let list = list.strip_prefix("one of ").unwrap_or(list);
        let names = backticked(list);
        if let Some(s) = closest(name, names.iter().copied()) {
            return format!(
                "{} (did you mean `{s}`?){}",
                &message[..after],
                &message[after..]
            );
        }
    }
    message.to_string()
}

/// ` (did you mean `x`?)` when [`closest`] finds one, else nothing: for the end of a message.
pub fn hint<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    closest(word, candidates)
        .map(|s| format!(" (did you mean `{s}`?)"))
        .unwrap_or_default()
}

/// The names between backticks in `s`.
fn backticked(s: &str) -> Vec<&str> {
    s.split('`').skip(1).step_by(2).collect()
}

/// Optimal string alignment distance.
fn distance(a: &[char], b: &[char]) -> usize {
    let (n, m) = (a.len(), b.len());
    let mut d = vec![vec![0usize; m + 1]; n + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=n {
        for j in 1..=m {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[n][m]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dist(a: &str, b: &str) -> usize {
        let a: Vec<char> = a.chars().collect();
        let b: Vec<char> = b.chars().collect();
        distance(&a, &b)
    }

    #[test]
    fn distance_counts_edits_and_neighbour_swaps() {
        assert_eq!(dist("", ""), 0);
        assert_eq!(dist("abc", ""), 3);
        assert_eq!(dist("kitten", "sitting"), 3);
        assert_eq!(dist("epcohs", "epochs"), 1);
        assert_eq!(dist("atack", "attack"), 1);
        assert_eq!(dist("ca", "abc"), 3);
    }

    #[test]
    fn suggests_only_a_clear_winner_within_a_third_of_the_name() {
        let fields = [
            "method", "attack", "views", "n_views", "epochs", "eps", "m", "width",
        ];
        assert_eq!(closest("n_veiws", fields), Some("n_views"));
        // one edit from both `views` and `n_views`: no guess
        assert_eq!(closest("nviews", fields), None);
        assert_eq!(closest("widht", fields), Some("width"));
        assert_eq!(closest("Epochs", fields), Some("epochs"));
        // "ep" is 1 from "eps" but 4 from "epochs": a short name gets 1 edit at most
        assert_eq!(closest("ep", fields), Some("eps"));
        assert_eq!(closest("n_view", fields), Some("n_views"));
        // two candidates at the same distance: no guess
        assert_eq!(closest("ab", ["ac", "ad"]), None);
        // too far
        assert_eq!(closest("learning_rate", fields), None);
        assert_eq!(closest("x", ["m"]), None);
        // the name itself is not a suggestion
        assert_eq!(closest("width", fields), None);
        // a name far longer than any candidate costs nothing
        assert_eq!(closest(&"e".repeat(1 << 20), fields), None);
    }

    #[test]
    fn explains_serde_unknown_field_and_variant_messages() {
        assert_eq!(
            explain("unknown field `atack`, expected one of `method`, `attack`, `views`"),
            "unknown field `atack` (did you mean `attack`?), expected one of `method`, `attack`, `views`"
        );
        assert_eq!(
            explain("unknown variant `slff`, expected `slf` or `alf`"),
            "unknown variant `slff` (did you mean `slf`?), expected `slf` or `alf`"
        );
        let far = "unknown field `learning_rate`, expected one of `lr`, `epochs`";
        assert_eq!(explain(far), far);
        let other = "invalid type: string \"a\", expected u64";
        assert_eq!(explain(other), other);
        assert_eq!(
            hint("pretrian", ["pretrain", "dataset"]),
            " (did you mean `pretrain`?)"
        );
        assert_eq!(hint("zzz", ["pretrain"]), "");
    }
}
