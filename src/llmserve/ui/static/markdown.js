// A small markdown renderer that builds DOM nodes (no HTML parsing: model output is untrusted)
// and a generic code highlighter. Covers what chat models write: headings, paragraphs, lists,
// quotes, rules, fenced code (an unclosed fence, as while streaming, runs to the end), inline
// code, bold, italic and http(s) links.

const KEYWORDS = new Set((
  "if else elif for while do return function def class import from export const let var new " +
  "try catch except finally raise throw with as in of is not and or async await yield lambda " +
  "pass break continue switch case default struct enum impl fn pub use mod match trait type " +
  "interface package func go defer select public private protected static void int float " +
  "double char bool boolean string true false null None True False nil self this super"
).split(" "));

const TOKEN = new RegExp([
  String.raw`(?<com>\/\/[^\n]*|\/\*[\s\S]*?\*\/|#[^\n]*|--[^\n]*)`,
  String.raw`(?<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|\`(?:[^\`\\]|\\.)*\`)`,
  String.raw`(?<num>\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b)`,
  String.raw`(?<word>[A-Za-z_$][\w$]*)`,
].join("|"), "g");

const HASH_COMMENTS = new Set(["python", "py", "sh", "bash", "shell", "yaml", "yml", "toml", "ruby", "rb", "r", ""]);
const DASH_COMMENTS = new Set(["sql", "lua", "haskell", "hs"]);

function span(cls, text) {
  const el = document.createElement("span");
  el.className = cls;
  el.textContent = text;
  return el;
}

/** `code` as a fragment of text and highlighted spans. */
export function highlight(code, lang = "") {
  const out = document.createDocumentFragment();
  const language = lang.toLowerCase();
  let last = 0;
  for (const m of code.matchAll(TOKEN)) {
    let cls = null;
    const g = m.groups;
    if (g.com !== undefined) {
      const hash = g.com.startsWith("#"), dash = g.com.startsWith("--");
      if ((hash && HASH_COMMENTS.has(language)) || (dash && DASH_COMMENTS.has(language)) || (!hash && !dash)) cls = "tok-com";
      else continue; // e.g. `#include` in C, `--flag` in a command line: not comments there
    } else if (g.str !== undefined) cls = "tok-str";
    else if (g.num !== undefined) cls = "tok-num";
    else if (KEYWORDS.has(g.word)) cls = "tok-kw";
    else if (code[m.index + g.word.length] === "(") cls = "tok-fn";
    if (!cls) continue;
    out.append(code.slice(last, m.index), span(cls, m[0]));
    last = m.index + m[0].length;
  }
  out.append(code.slice(last));
  return out;
}

const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([\s\S]+?)\*\*|__([\s\S]+?)__|\*([^*\s](?:[^*]*[^*\s])?)\*|\[([^\]\n]+)\]\(([^)\s]+)\)/g;

/** Append `text` with inline markup to `parent`. */
function inline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    parent.append(text.slice(last, m.index));
    last = m.index + m[0].length;
    if (m[1]) {
      const code = document.createElement("code");
      code.textContent = m[2];
      parent.append(code);
    } else if (m[3] || m[4]) {
      const strong = document.createElement("strong");
      inline(strong, m[3] || m[4]);
      parent.append(strong);
    } else if (m[5]) {
      const em = document.createElement("em");
      inline(em, m[5]);
      parent.append(em);
    } else if (/^https?:\/\//i.test(m[7])) {
      const a = document.createElement("a");
      a.href = m[7];
      a.rel = "noopener noreferrer";
      a.target = "_blank";
      inline(a, m[6]);
      parent.append(a);
    } else {
      parent.append(m[0]); // other schemes (javascript:, data:) stay text
    }
  }
  parent.append(text.slice(last));
}

function withLines(el, lines) {
  lines.forEach((line, i) => {
    if (i) el.append(document.createElement("br"));
    inline(el, line);
  });
  return el;
}

const LIST_ITEM = /^\s*([-*+]|\d+[.)])\s+(.*)$/;

/** `source` rendered as a fragment of block elements. */
export function renderMarkdown(source) {
  const out = document.createDocumentFragment();
  const lines = source.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*(```+|~~~+)\s*([\w+#.-]*)/);
    if (fence) {
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) body.push(lines[i]);
      i++;
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      if (fence[2]) code.dataset.lang = fence[2];
      code.append(highlight(body.join("\n"), fence[2]));
      pre.append(code);
      out.append(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      out.append(withLines(document.createElement(`h${Math.min(6, heading[1].length + 2)}`), [heading[2]]));
      i++;
      continue;
    }
    if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      out.append(document.createElement("hr"));
      i++;
      continue;
    }
    if (line.startsWith(">")) {
      const quoted = [];
      for (; i < lines.length && lines[i].startsWith(">"); i++) quoted.push(lines[i].replace(/^>\s?/, ""));
      const quote = document.createElement("blockquote");
      quote.append(renderMarkdown(quoted.join("\n")));
      out.append(quote);
      continue;
    }
    const item = line.match(LIST_ITEM);
    if (item) {
      const list = document.createElement(/\d/.test(item[1]) ? "ol" : "ul");
      for (; i < lines.length && LIST_ITEM.test(lines[i]); i++) {
        list.append(withLines(document.createElement("li"), [lines[i].match(LIST_ITEM)[2]]));
      }
      out.append(list);
      continue;
    }
    if (!line.trim()) {
      i++;
      continue;
    }
    const para = [];
    para.push(lines[i++]); // the first line always belongs here, so the loop always advances
    for (; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i++) para.push(lines[i]);
    out.append(withLines(document.createElement("p"), para));
  }
  return out;
}

function startsBlock(line) {
  return /^\s*(```|~~~)|^#{1,6}\s|^>/.test(line) || LIST_ITEM.test(line);
}
