// The anywidget entry point: one shared row store per model, one TraceView per view.
// Talks to the kernel only through the typed messages of ./messages (generated from Python).

import type { AnyModel, Initialize, Render } from "@anywidget/types";
import type { FrontendMessage, KernelMessage, WidgetState } from "./messages";
import { RowStore } from "./store";
import css from "./style.css";
import { type Shared, TraceView } from "./view";

const models = new WeakMap<AnyModel<WidgetState>, Shared>();

function sharedOf(model: AnyModel<WidgetState>): Shared {
  const known = models.get(model);
  if (known) return known;
  const s: Shared = {
    store: new RowStore(model.get("steps") ?? [], model.get("steps_rev") ?? 0),
    expanded: new Set(),
    detail: null,
    notice: null,
    selected: null,
    views: new Set(),
    send: (msg: FrontendMessage) => model.send(msg),
  };
  const changed = (): void => {
    for (const v of s.views) v();
  };
  let syncing = false;
  const resync = (): void => {
    // a whole list at least as new as ours replaces it (the kernel's revisions only grow)
    const rev = model.get("steps_rev") ?? 0;
    if (rev >= s.store.rev || syncing) {
      s.store.reset(model.get("steps") ?? [], rev);
      syncing = false;
      changed();
    }
  };
  model.on("change:steps", resync);
  model.on("change:steps_rev", resync);
  model.on("msg:custom", (msg: KernelMessage) => {
    if (msg.kind === "rows") {
      const result = s.store.apply(msg);
      if (result === "applied") changed();
      else if (result === "gap" && !syncing) {
        syncing = true; // missed a patch (sent before this view loaded): ask for the whole list
        s.send({ kind: "sync", rev: s.store.rev });
      }
    } else if (msg.kind === "detail") {
      if (s.selected === `${msg.seq}:${msg.name}`) s.detail = msg;
      changed();
    } else if (msg.kind === "notice") {
      s.notice = msg;
      changed();
    }
  });
  models.set(model, s);
  return s;
}

let styled = false;
function ensureStyle(): void {
  if (styled) return;
  styled = true;
  const style = document.createElement("style");
  style.dataset.durableNb = "trace";
  style.textContent = css;
  document.head.append(style);
}

const initialize: Initialize<WidgetState> = ({ model }) => {
  const s = sharedOf(model);
  s.send({ kind: "sync", rev: s.store.rev }); // patches sent before this model loaded are lost
};

const render: Render<WidgetState> = ({ model, el }) => {
  ensureStyle();
  const view = new TraceView(el, model, sharedOf(model));
  return () => view.destroy();
};

export default { initialize, render };
