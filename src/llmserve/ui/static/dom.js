// Small DOM builders shared by the console's tabs (text only: never innerHTML).

/** A new element with an optional class and text. */
export function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A button (type=button) that calls `onClick`. */
export function button(text, onClick) {
  const b = el("button", null, text);
  b.type = "button";
  b.addEventListener("click", onClick);
  return b;
}
