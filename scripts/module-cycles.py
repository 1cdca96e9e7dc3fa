#!/usr/bin/env python3
"""Fail when the crate's modules import each other in a circle, and name it.

The module graph is built from the source: every `crate::…`, `super::…` and
`self::…` path in a file (in `use` trees, braces expanded, and inline in
code) is an edge from that file's module to the deepest module the path
names. `mod` declarations are not imports. Comments and string literals are
ignored. A module's unit tests count as the module (an import there is an
import of the room).

  python3 scripts/module-cycles.py            # check src/, exit 1 on a cycle
  python3 scripts/module-cycles.py --edges    # also print every edge
  python3 scripts/module-cycles.py --floors   # print the floors table
  python3 scripts/module-cycles.py --check-doc ARCHITECTURE.md
                                              # and fail when its table differs

Exit 0 and "no import cycle among N modules" when the graph is acyclic;
otherwise one line per strongly connected set of modules, with one concrete
loop through it, and exit 1.
"""

import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def module_of(rel):
    """src-relative file path -> module path ('crate', 'crate::a::b')."""
    parts = rel[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return "::".join(["crate"] + parts)


def strip(text):
    """Remove comments, string and char literals (keeping line structure)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:i + 8]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            end = '"' + m.group(1)
            j = text.find(end, i + len(m.group(0)))
            i = n if j < 0 else j + len(end)
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4]) or (c == "'" and text.startswith("'\\u{", i)):
            j = text.find("'", i + 1)
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def expand(tree):
    """Expand a use tree ('a::{b, c::{d, e}}') into full paths."""
    tree = tree.strip()
    if not tree:
        return []
    depth, start = 0, None
    for k, ch in enumerate(tree):
        if ch == "{":
            if depth == 0:
                start = k
            depth += 1
        elif ch == "}":
            depth -= 1
    if start is None:
        return [tree]
    prefix = tree[:start].rstrip(":").strip()
    inner = tree[start + 1:tree.rindex("}")]
    items, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    items.append(cur)
    paths = []
    for item in items:
        for sub in expand(item):
            sub = sub.split(" as ")[0].strip()
            if sub == "self":
                paths.append(prefix)
            elif prefix:
                paths.append(prefix + "::" + sub)
            else:
                paths.append(sub)
    return paths


def resolve(path, here, modules):
    """A path as written in module `here` -> the deepest known module, or None."""
    parts = [p.strip() for p in path.split("::") if p.strip()]
    if not parts:
        return None
    base = here.split("::")
    if parts[0] == "crate":
        absolute = parts
    elif "::".join(base[:1] + [b for b in base[1:] if not b.startswith("#")] + parts[:1]) in modules and not base[-1].startswith("#"):
        # A child module of this one, named without `self::`.
        absolute = base + parts
    elif parts[0] in ("super", "self"):
        cur = base[:]
        while parts and parts[0] in ("super", "self"):
            if parts[0] == "super":
                cur = cur[:-1]
            parts = parts[1:]
        absolute = cur + parts
    else:
        return None
    for k in range(len(absolute), 0, -1):
        cand = "::".join(absolute[:k])
        if cand in modules:
            return cand
    return None


def inline_modules(text):
    """(start, end, name) of every inline `mod NAME { ... }` block."""
    blocks = []
    for m in re.finditer(r"\bmod\s+([A-Za-z_][A-Za-z0-9_]*)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += text[i] == "{"
            depth -= text[i] == "}"
            i += 1
        blocks.append((m.start(), i, m.group(1)))
    return blocks


def nested(mod, blocks, pos):
    """The module a position of file module `mod` is in, inline modules
    marked with `#` so they resolve `super` to the file's module."""
    names = [name for start, end, name in sorted(blocks) if start < pos < end]
    return "::".join([mod] + ["#" + n for n in names])


def build():
    files = {}
    for dirpath, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".rs"):
                rel = os.path.relpath(os.path.join(dirpath, name), ROOT)
                if rel == "main.rs":
                    continue  # the binary: imports the library as `agentd::`
                files[module_of(rel)] = rel
    edges = {m: set() for m in files}
    use_re = re.compile(r"\buse\s+([^;]+);", re.S)
    path_re = re.compile(r"\b((?:crate|super|self)(?:\s*::\s*[A-Za-z_][A-Za-z0-9_]*)+)")
    for mod, rel in files.items():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            text = strip(f.read())
        blocks = inline_modules(text)
        found = []
        for m in use_re.finditer(text):
            here = nested(mod, blocks, m.start())
            found.extend((here, p) for p in expand(re.sub(r"\s+", " ", m.group(1))))
        rest = use_re.sub(lambda m: " " * len(m.group(0)), text)
        for m in path_re.finditer(rest):
            found.append((nested(mod, blocks, m.start()), m.group(1).replace(" ", "")))
        children = sorted(c.rsplit("::", 1)[1] for c in files if c.rsplit("::", 1)[0] == mod and c != mod)
        if children:
            child_re = re.compile(r"(?<![A-Za-z0-9_:])((?:" + "|".join(children) + r")(?:\s*::\s*[A-Za-z_][A-Za-z0-9_]*)+)")
            for m in child_re.finditer(rest):
                found.append((nested(mod, blocks, m.start()), m.group(1).replace(" ", "")))
        for here, p in found:
            target = resolve(p, here, files)
            # An inline module (`mod tests`) is part of its file's room.
            if target and target != mod and target != "crate" and not target.startswith(mod + "::#"):
                edges[mod].add(target)
    return files, edges


def sccs(edges):
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def a_loop(comp, edges):
    """One concrete cycle through the first module of a strongly connected set."""
    members = set(comp)
    start = comp[0]
    prev, queue = {start: None}, [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges[v]):
            if w not in members:
                continue
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return list(reversed(path)) + [start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return comp


def floors(edges):
    """Each module's floor: 0 imports no module, else 1 + its highest import."""
    memo = {}

    def floor(v, seen=()):
        if v in memo:
            return memo[v]
        if v in seen:
            return 0
        f = 0 if not edges[v] else 1 + max(floor(w, seen + (v,)) for w in edges[v])
        memo[v] = f
        return f

    return {v: floor(v) for v in edges}


FLOORS_BEGIN = "<!-- floors: scripts/module-cycles.py --floors -->"
FLOORS_END = "<!-- end of floors -->"


def floor_table(edges):
    """The floors as the markdown table ARCHITECTURE.md shows, highest first."""
    by = {}
    for v, f in floors(edges).items():
        if v != "crate":
            by.setdefault(f, []).append(short(v))
    rows = ["| floor | modules (each imports only modules on lower floors) |", "|---|---|"]
    for f in sorted(by, reverse=True):
        rows.append(f"| {f} | {', '.join(f'`{m}`' for m in sorted(by[f]))} |")
    return "\n".join(rows)


def short(m):
    return m[len("crate::"):] if m.startswith("crate::") else m


def main():
    files, edges = build()
    if "--edges" in sys.argv:
        for v in sorted(edges):
            for w in sorted(edges[v]):
                print(f"{short(v)} -> {short(w)}")
    loops = [c for c in sccs(edges) if len(c) > 1]
    if loops:
        for comp in loops:
            cycle = a_loop(comp, edges)
            print(f"import cycle among {len(comp)} modules ({', '.join(short(m) for m in comp)}): "
                  + " -> ".join(short(m) for m in cycle))
        print(f"{len(loops)} import cycle(s) among {len(files)} modules; a room may import only rooms below it (ARCHITECTURE.md)")
        return 1
    table = floor_table(edges)
    if "--floors" in sys.argv:
        print(table)
    if "--check-doc" in sys.argv:
        doc = sys.argv[sys.argv.index("--check-doc") + 1]
        with open(doc, encoding="utf-8") as f:
            text = f.read()
        if FLOORS_BEGIN not in text or FLOORS_END not in text:
            print(f"{doc} has no floors table between {FLOORS_BEGIN} and {FLOORS_END}")
            return 1
        written = text.split(FLOORS_BEGIN, 1)[1].split(FLOORS_END, 1)[0].strip()
        if written != table:
            print(f"{doc}'s floors table is not the crate's; the crate's is (--floors):")
            print(table)
            return 1
        print(f"{doc}'s floors table is the crate's")
    print(f"no import cycle among {len(files)} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
