#!/usr/bin/env python3
"""Prints import cycles between the library's modules; exits 1 if there is any.

Reads every `src/**/*.rs` file of the library crate (`main.rs` is its own crate and is
skipped), collects the `crate::…`, `super::…` and `self::…` paths it names (in `use` lines and
inline), resolves each to the file that defines it, and looks for strongly connected components
in two graphs:

  * top-level modules (`config`, `auth`, `tls`, …): an edge when a file of one names the other;
  * files (`src/config/session_store.rs`, …): an edge when a file names an item of another.

Code under `#[cfg(test)]` is left out by default (tests may reach anywhere); pass `--tests` to
include it. Usage: `python3 scripts/module-cycles.py [--tests] [--top-only] [--src DIR]`.
"""

import argparse
import os
import re
import sys

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def starts_token(text, i):
    """Whether a token can start at `i` (nothing of an identifier right before it)."""
    return i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")


def strip_comments_and_strings(text):
    """Blanks out comments, string and char literals, keeping newlines and offsets."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 20]) and starts_token(text, i - 1 if i and text[i - 1] == "b" else i):
            m = re.match(r'r(#*)"', text[i:])
            end = '"' + m.group(1)
            j = text.find(end, i + len(m.group(0)))
            j = n if j < 0 else j + len(end)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "'" and re.match(r"'(\\.|[^\\'])'|'\\u\{[0-9a-fA-F]+\}'|'\\x[0-9a-fA-F]{2}'", text[i:i + 12]):
            m = re.match(r"'(\\.|[^\\'])'|'\\u\{[0-9a-fA-F]+\}'|'\\x[0-9a-fA-F]{2}'", text[i:i + 12])
            out.append(" " * len(m.group(0)))
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def block_end(text, start):
    """Index just past the `{…}` block opening at or after `start` (or the item's `;`)."""
    i = start
    while i < len(text) and text[i] not in "{;":
        i += 1
    if i >= len(text) or text[i] == ";":
        return i + 1
    depth = 0
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(text)


def drop_test_code(text):
    """Blanks out items under `#[cfg(test)]`."""
    for m in reversed(list(re.finditer(r"#\[cfg\(test\)\]", text))):
        end = block_end(text, m.end())
        text = text[:m.start()] + re.sub(r"[^\n]", " ", text[m.start():end]) + text[end:]
    return text


def expand_use_tree(tree):
    """`a::{b, c::{d as e}}` -> [(`a::b`, `b`), (`a::c::d`, `e`)]: each path and the name it
    binds (`None` for a glob)."""
    tree = re.sub(r"\s+", " ", tree)
    tree = re.sub(r"\s*(::|,|\{|\})\s*", r"\1", tree).strip()
    out = []

    def walk(prefix, s):
        depth, parts, cur = 0, [], ""
        for ch in s:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        if cur.strip():
            parts.append(cur)
        for p in parts:
            p = p.strip()
            if "{" in p:
                head, rest = p.split("{", 1)
                walk(prefix + head, rest[:-1])
                continue
            alias = None
            m = re.match(r"(.*?)\s+as\s+(" + IDENT + r")$", p)
            if m:
                p, alias = m.group(1), m.group(2)
            full = prefix + p
            if full.endswith("::*"):
                out.append((full[:-3], None))
                continue
            full = re.sub(r"::self$", "", full)
            out.append((full, alias or full.rsplit("::", 1)[-1]))

    walk("", tree)
    return out


class Crate:
    def __init__(self, src, with_tests=False):
        self.src = src
        self.files = {}  # module path tuple -> file path
        for root, _, names in os.walk(src):
            for name in names:
                if not name.endswith(".rs"):
                    continue
                path = os.path.join(root, name)
                rel = os.path.relpath(path, src)
                if rel == "main.rs" or rel.startswith("bin" + os.sep):
                    continue
                parts = rel[:-3].split(os.sep)
                if parts[-1] in ("mod", "lib"):
                    parts = parts[:-1]
                self.files[tuple(parts)] = path
        self.texts = {}
        for module, path in self.files.items():
            text = strip_comments_and_strings(open(path, encoding="utf-8").read())
            self.texts[module] = text if with_tests else drop_test_code(text)
        # What each module's `use` items bind: name -> absolute path (re-exports included),
        # and the modules it glob-imports (`use super::*`).
        self.bindings = {m: {} for m in self.files}
        self.globs = {m: [] for m in self.files}
        for module, text in self.texts.items():
            for m in re.finditer(r"\buse\s+([^;]*);", text):
                for path, name in expand_use_tree(m.group(1)):
                    absolute = self.absolute(module, path)
                    if absolute is None:
                        continue
                    if name is None:
                        self.globs[module].append(absolute)
                    else:
                        self.bindings[module][name] = absolute

    def children(self, module):
        here = list(module)
        return [k[-1] for k in self.files if len(k) == len(here) + 1 and list(k[:-1]) == here]

    def absolute(self, module, path):
        """`path` as named in `module`, from the crate root; `None` for std and external crates."""
        segs = path.split("::")
        here = list(module)
        if segs[0] == "crate":
            return segs[1:]
        if segs[0] == "self":
            return here + segs[1:]
        if segs[0] == "super":
            base = here
            while segs and segs[0] == "super":
                base = base[:-1]
                segs = segs[1:]
            return base + segs
        if segs[0] in self.children(module):
            return here + segs
        return None

    def resolve(self, segments, depth=0):
        """The file that defines what an absolute path names: its longest file-backed prefix,
        through the `use` items of that file (a `mod.rs` re-exporting a child's item)."""
        for k in range(len(segments), -1, -1):
            module = tuple(segments[:k])
            if module in self.files:
                rest = segments[k:]
                if rest and depth < 8 and rest[0] in self.bindings[module]:
                    target = self.bindings[module][rest[0]] + rest[1:]
                    return self.resolve(target, depth + 1) or module
                return module
        return None

    def references(self, module):
        """Every module tuple the file of `module` names."""
        text = self.texts[module]
        # A visibility path (`pub(in crate::auth)`) names who may see an item, not a use.
        text = re.sub(r"\bpub\s*\(\s*in\s+[^)]*\)", "pub", text)
        paths = []
        for m in re.finditer(r"\buse\s+([^;]*);", text):
            paths.extend(p for p, _ in expand_use_tree(m.group(1)))
        for m in re.finditer(r"(?<![:\w])((?:crate|super|self)(?:\s*::\s*" + IDENT + r")+)", text):
            paths.append(re.sub(r"\s+", "", m.group(1)))
        children = self.children(module)
        if children:
            child = "|".join(re.escape(c) for c in children)
            for m in re.finditer(r"(?<![:\w])((?:" + child + r")(?:\s*::\s*" + IDENT + r")+)", text):
                paths.append(re.sub(r"\s+", "", m.group(1)))
        # Names that stand for a path here: what `use` bound, and what a glob import brought
        # (the glob target's child modules and its own bindings).
        named = dict(self.bindings[module])
        for target in self.globs[module]:
            t = tuple(target)
            for c in self.children(t) if t in self.files else []:
                named.setdefault(c, list(target) + [c])
            for name, absolute in self.bindings.get(t, {}).items():
                named.setdefault(name, absolute)
        absolute_paths = []
        if named:
            alt = "|".join(re.escape(n) for n in sorted(named, key=len, reverse=True))
            for m in re.finditer(r"(?<![:\w])(" + alt + r")((?:\s*::\s*" + IDENT + r")+)", text):
                rest = re.sub(r"\s+", "", m.group(2)).split("::")[1:]
                absolute_paths.append(named[m.group(1)] + rest)
        found = set()
        for absolute in absolute_paths:
            target = self.resolve(absolute)
            if target is not None and target != module:
                found.add(target)
        for p in paths:
            absolute = self.absolute(module, p)
            if absolute is None:
                continue
            target = self.resolve(absolute)
            if target is not None and target != module:
                found.add(target)
        return found


def sccs(graph):
    """Tarjan's strongly connected components (iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def one_cycle(graph, comp):
    """A shortest cycle through the component's first node, for the message."""
    members = set(comp)
    start = comp[0]
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return [start] + list(reversed(path))[1:] + [start] if len(path) > 1 else [start, node, start][: 2 if node == start else 3]
                if nxt in members and nxt not in prev:
                    prev[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return comp


def report(title, graph, name):
    comps = sccs(graph)
    print(f"{title}: {len(comps)} cycle(s)")
    for comp in comps:
        cycle = one_cycle(graph, comp)
        print(f"  {len(comp)} in a circle: {', '.join(name(c) for c in comp)}")
        print(f"    e.g. {' -> '.join(name(c) for c in cycle)}")
    return len(comps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=os.path.join(os.path.dirname(__file__), "..", "src"))
    ap.add_argument("--tests", action="store_true", help="include #[cfg(test)] code")
    ap.add_argument("--top-only", action="store_true", help="fail only on top-level cycles")
    args = ap.parse_args()
    crate = Crate(os.path.normpath(args.src), args.tests)
    files = {module: crate.references(module) for module in crate.files}
    top = {}
    for module, refs in files.items():
        if not module:
            continue
        node = module[0]
        top.setdefault(node, set())
        for r in refs:
            if r and r[0] != node:
                top[node].add(r[0])

    def file_name(m):
        return os.path.relpath(crate.files[m], os.path.dirname(crate.src))

    n_top = report("top-level modules", top, lambda m: m)
    n_files = report("files", files, file_name)
    failed = n_top if args.top_only else n_top + n_files
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
