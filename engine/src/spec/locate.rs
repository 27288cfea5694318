//! Source positions for YAML paths.
//!
//! serde_yaml gives a position only for syntax errors, so a second, event-level pass
//! (yaml-rust2's marked parser) records where every mapping key and sequence item starts. Semantic
//! errors (an unknown kind, a bad param) then point at a line. It also finds duplicate keys,
//! which serde_yaml reports one at a time.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A duplicate mapping key: its path and the two positions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Duplicate {
    /// YAML path of the repeated key.
    pub path: String,
    /// Position of the repeat.
    pub at: (usize, usize),
    /// Position of the first occurrence.
    pub first: (usize, usize),
}

/// YAML path -> (line, column), 1-based.
#[derive(Debug, Default)]
pub struct Locator {
    positions: HashMap<String, (usize, usize)>,
    /// Lines in the text: positions are clamped to it (the scanner's end-of-input mark may sit
    /// on the line after the last).
    lines: usize,
    /// Every duplicate key in the document.
    pub duplicates: Vec<Duplicate>,
}

enum Frame {
    Map {
        path: String,
        key: Option<String>,
        seen: HashMap<String, (usize, usize)>,
    },
    Seq {
        path: String,
        index: usize,
    },
    /// A complex (non-scalar) mapping key: ignored.
    Skip {
        depth: usize,
    },
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

struct Builder {
    stack: Vec<Frame>,
    loc: Locator,
    docs: usize,
}

impl Builder {
    /// The path of the node that is starting now (a value), or None while reading a key.
    fn value_path(&mut self) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { path, key, .. }) => key.take().map(|k| join(path, &k)),
            Some(Frame::Seq { path, index }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                Some(p)
            }
            Some(Frame::Skip { .. }) => None,
        }
    }

    fn node(&mut self, ev: &Event, mark: Marker) {
        let pos = (mark.line(), mark.col() + 1);
        if let Some(Frame::Skip { depth }) = self.stack.last_mut() {
            match ev {
                Event::MappingStart(..) | Event::SequenceStart(..) => *depth += 1,
                Event::MappingEnd | Event::SequenceEnd => {
                    *depth -= 1;
                    if *depth == 0 {
                        self.stack.pop();
                    }
                }
                _ => {}
            }
            return;
        }
        // A scalar (or alias, or collection) in key position of a mapping.
        if let Some(Frame::Map { path, key, seen }) = self.stack.last_mut()
            && key.is_none()
        {
            {
                match ev {
                    Event::Scalar(s, ..) => {
                        let full = join(path, s);
                        if let Some(first) = seen.get(s) {
                            self.loc.duplicates.push(Duplicate {
                                path: full.clone(),
                                at: pos,
                                first: *first,
                            });
                        } else {
                            seen.insert(s.clone(), pos);
                        }
                        self.loc.positions.entry(full).or_insert(pos);
                        *key = Some(s.clone());
                    }
                    Event::MappingStart(..) | Event::SequenceStart(..) => {
                        *key = Some("?".into());
                        self.stack.push(Frame::Skip { depth: 1 });
                    }
                    Event::Alias(_) => *key = Some("*".into()),
                    Event::MappingEnd => {
                        self.stack.pop();
                    }
                    _ => {}
                }
                return;
            }
        }
        match ev {
            Event::Scalar(..) | Event::Alias(_) => {
                if let Some(p) = self.value_path() {
                    self.loc.positions.entry(p).or_insert(pos);
                }
            }
            Event::MappingStart(..) => {
                let p = self.value_path().unwrap_or_default();
                self.loc.positions.entry(p.clone()).or_insert(pos);
                self.stack.push(Frame::Map {
                    path: p,
                    key: None,
                    seen: HashMap::new(),
                });
            }
            Event::SequenceStart(..) => {
                let p = self.value_path().unwrap_or_default();
                self.loc.positions.entry(p.clone()).or_insert(pos);
                self.stack.push(Frame::Seq { path: p, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::DocumentStart => self.docs += 1,
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => {}
            _ if self.docs <= 1 => self.node(&ev, mark),
            _ => {}
        }
    }
}

impl Locator {
    /// Scans `text`. A syntax error yields an empty locator (serde_yaml reports it with its
    /// position).
    pub fn new(text: &str) -> Locator {
        let mut b = Builder {
            stack: Vec::new(),
            loc: Locator::default(),
            docs: 0,
        };
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut b, false).is_err() {
            return Locator::default();
        }
        let mut loc = b.loc;
        loc.lines = text.split('\n').count();
        loc
    }

    /// Position of `path`, or of its nearest ancestor that is written in the file (a param
    /// that came through a `<<: *anchor` merge points at the stage that merged it).
    pub fn locate(&self, path: &str) -> Option<(usize, usize)> {
        let mut p = path;
        loop {
            if let Some(&(line, col)) = self.positions.get(p) {
                return Some(if self.lines > 0 && line > self.lines {
                    (self.lines, 1)
                } else {
                    (line, col)
                });
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "name: x\nstages:\n  a:\n    kind: shell\n    params: {cmd: echo, n: [1, 2]}\n  b:\n    kind: shell\n    params:\n      cmd: true\n";

    #[test]
    fn positions_of_keys_and_items() {
        let l = Locator::new(DOC);
        assert_eq!(l.locate("stages.a.kind"), Some((4, 5)));
        assert_eq!(l.locate("stages.a.params.cmd"), Some((5, 14)));
        assert_eq!(l.locate("stages.b.params.cmd"), Some((9, 7)));
        assert_eq!(l.locate("stages.a.params.n[1]"), Some((5, 32)));
        // unknown leaf: nearest written ancestor
        assert_eq!(l.locate("stages.b.params.missing"), Some((8, 5)));
        assert!(l.duplicates.is_empty());
    }

    #[test]
    fn positions_stay_inside_the_text() {
        // a lone tag: the scalar's mark is the end of input, past the only line
        let l = Locator::new("!");
        assert_eq!(l.locate(""), Some((1, 1)));
        let l = Locator::new("a: !t\n");
        assert!(l.locate("a").is_some_and(|(line, _)| line <= 2));
    }

    #[test]
    fn duplicates_are_all_found() {
        let l = Locator::new("stages:\n  a: {kind: shell}\n  a: {kind: shell}\n  b: {}\n  b: {}\n");
        let paths: Vec<_> = l
            .duplicates
            .iter()
            .map(|d| (d.path.as_str(), d.at.0, d.first.0))
            .collect();
        assert_eq!(paths, vec![("stages.a", 3, 2), ("stages.b", 5, 4)]);
    }
}
