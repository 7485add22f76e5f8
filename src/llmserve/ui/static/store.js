// Conversations kept in this browser (localStorage), exportable as JSON.

const SLOT = "llmserve.conversations";

function newId() {
  return `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
}

export class ConversationStore {
  constructor(storage = localStorage) {
    this.storage = storage;
    this.items = this.read();
  }

  read() {
    try {
      const items = JSON.parse(this.storage.getItem(SLOT) || "[]");
      return Array.isArray(items) ? items : [];
    } catch (_) {
      return []; // a corrupt entry must not break the page
    }
  }

  save() {
    this.storage.setItem(SLOT, JSON.stringify(this.items));
  }

  create() {
    const conversation = { id: newId(), title: "New chat", created: Date.now(), system: "", messages: [] };
    this.items.unshift(conversation);
    this.save();
    return conversation;
  }

  get(id) {
    return this.items.find((c) => c.id === id) || null;
  }

  remove(id) {
    this.items = this.items.filter((c) => c.id !== id);
    this.save();
  }

  /** Every conversation as a downloadable JSON file. */
  exportFile() {
    const blob = new Blob([JSON.stringify({ exported: new Date().toISOString(), conversations: this.items }, null, 2)],
      { type: "application/json" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `llmserve-chats-${new Date().toISOString().slice(0, 10)}.json`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  }
}
