// One view of a trace model: header, totals, signal panel, the virtualized timeline and the
// detail panel of the clicked step. Several views of one model share its rows (Shared).

import type { AnyModel } from "@anywidget/types";
import type {
  DetailMessage,
  FrontendMessage,
  NoticeMessage,
  RunInfo,
  Totals,
  Waiting,
  WidgetState,
} from "./messages";
import { type Item, type RowStore, checkPayload, foldRows, formatDuration, visibleRange } from "./store";

export const LINE = 22; // px per timeline line (matches .dn-row's height)

/** What the views of one model share: its rows and the last detail and notice. */
export interface Shared {
  store: RowStore;
  expanded: Set<number>;
  detail: DetailMessage | null;
  notice: NoticeMessage | null;
  selected: string | null;
  views: Set<() => void>;
  send(msg: FrontendMessage): void;
}

function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  text?: string,
): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function badge(state: string): HTMLSpanElement {
  return h("span", { class: "dn-badge", "data-state": state }, state);
}

export class TraceView {
  private readonly root: HTMLDivElement;
  private readonly head = h("div", { class: "dn-head" });
  private readonly totals = h("div", { class: "dn-totals" });
  private readonly actions = h("div", { class: "dn-actions" });
  private readonly notice = h("div", { class: "dn-notice" });
  private readonly timeline = h("div", { class: "dn-timeline" });
  private readonly spacer = h("div", { class: "dn-spacer" });
  private readonly detail = h("div", { class: "dn-detail" });
  private items: Item[] = [];
  private actionsKey = "";
  private readonly payloads = new Map<string, string>();
  private frame = 0;
  private follow = true;
  private readonly onChange = (): void => this.schedule();

  constructor(
    el: HTMLElement,
    private readonly model: AnyModel<WidgetState>,
    private readonly shared: Shared,
  ) {
    this.root = h("div", { class: "dn-trace" });
    this.timeline.append(this.spacer);
    this.root.append(this.head, this.totals, this.actions, this.notice, this.timeline, this.detail);
    el.append(this.root);
    this.timeline.addEventListener("scroll", () => {
      const t = this.timeline;
      this.follow = t.scrollTop + t.clientHeight >= t.scrollHeight - LINE;
      this.schedule();
    });
    for (const key of ["run", "totals", "waiting"] as const) model.on(`change:${key}`, this.onChange);
    shared.views.add(this.onChange);
    this.render(); // the first picture synchronously: the benchmark times it
  }

  destroy(): void {
    this.shared.views.delete(this.onChange);
    for (const key of ["run", "totals", "waiting"] as const) this.model.off(`change:${key}`, this.onChange);
    if (this.frame) cancelAnimationFrame(this.frame);
  }

  private schedule(): void {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.render();
    });
  }

  render(): void {
    const run = this.model.get("run");
    this.renderHead(run, this.model.get("totals"));
    this.renderActions(run, this.model.get("waiting") ?? []);
    this.renderNotice(this.shared.notice);
    this.renderTimeline(run);
    this.renderDetail(this.shared.detail);
  }

  private renderHead(run: RunInfo | undefined, totals: Totals | undefined): void {
    if (!run) return;
    this.head.replaceChildren(
      h("span", {}, "run"),
      h("code", {}, run.run_id),
      badge(run.status),
      h("span", { class: "dn-detail-text" }, run.detail),
    );
    if (run.forked_from) this.head.append(h("span", { class: "dn-forked" }, `forked from ${run.forked_from}`));
    this.root.dataset.status = run.status;
    if (totals) {
      this.totals.textContent =
        `${totals.steps} steps · ${totals.executed} executed · ${totals.replayed} replayed · ` +
        `${totals.failed} failed` +
        (totals.running ? ` · ${totals.running} in progress` : "") +
        ` · saved ${formatDuration(totals.saved_seconds)}`;
    }
  }

  private renderActions(run: RunInfo | undefined, waiting: Waiting[]): void {
    const signals = waiting.filter((w) => w.kind === "signal").map((w) => w.name);
    const key = JSON.stringify([signals, run?.can_cancel, run?.can_resume]);
    if (key === this.actionsKey) return; // keep what is being typed in the payload fields
    this.actionsKey = key;
    const parts: HTMLElement[] = [];
    for (const name of signals) {
      const box = h("span", { class: "dn-signal" });
      const input = h("input", {
        type: "text",
        placeholder: "payload (JSON), e.g. true",
        "aria-label": `payload for signal ${name}`,
        "data-payload": name,
      });
      input.value = this.payloads.get(name) ?? "";
      input.addEventListener("input", () => this.payloads.set(name, input.value));
      const button = h("button", { class: "dn-primary", "data-signal": name }, `Send ${name}`);
      button.addEventListener("click", () => {
        const problem = checkPayload(input.value);
        if (problem !== null) {
          this.shared.notice = { kind: "notice", level: "error", text: `payload ${problem}` };
          this.renderNotice(this.shared.notice);
          return;
        }
        this.shared.send({ kind: "signal", name, payload: input.value });
      });
      box.append(button, input);
      parts.push(box);
    }
    if (run?.can_cancel) parts.push(this.button("Cancel", "cancel"));
    if (run?.can_resume) parts.push(this.button("Resume", "resume"));
    this.actions.replaceChildren(...parts);
  }

  private button(text: string, kind: "cancel" | "resume"): HTMLButtonElement {
    const b = h("button", { "data-action": kind }, text);
    b.addEventListener("click", () => this.shared.send({ kind }));
    return b;
  }

  private renderNotice(notice: NoticeMessage | null): void {
    this.notice.textContent = notice ? notice.text : "";
    this.notice.dataset.level = notice ? notice.level : "";
  }

  private renderTimeline(run: RunInfo | undefined): void {
    const rows = this.shared.store.rows;
    this.items = foldRows(rows, this.shared.expanded);
    const total = this.items.length * LINE;
    this.spacer.style.height = `${total}px`;
    const t = this.timeline;
    if (this.follow && run?.live) t.scrollTop = total; // keep the newest step in sight
    const viewport = t.clientHeight || 330;
    const [start, end] = visibleRange(t.scrollTop, viewport, LINE, this.items.length);
    let longest = 0;
    for (const r of rows) if (r.duration > longest) longest = r.duration;
    const lines: HTMLElement[] = [];
    for (let k = start; k < end; k++) lines.push(this.line(this.items[k]!, k, longest));
    this.spacer.replaceChildren(...lines);
    this.root.dataset.rows = String(rows.length);
  }

  private line(item: Item, k: number, longest: number): HTMLElement {
    const e = h("div", { class: "dn-row", role: "row" });
    e.style.top = `${k * LINE}px`;
    if (item.type === "group") {
      e.classList.add("dn-group");
      e.dataset.state = "replayed";
      e.title = "click to show these steps";
      e.append(
        h("span", { class: "dn-seq" }),
        badge("replayed"),
        h("span", { class: "dn-label" }, `▸ ${item.count.toLocaleString()} replayed steps`),
        h("span"),
        h("span", { class: "dn-dur" }, `saved ${formatDuration(item.saved)}`),
      );
      e.addEventListener("click", () => {
        this.shared.expanded.add(item.first);
        this.render();
      });
      return e;
    }
    const r = item.row;
    const key = `${r.seq}:${r.name}`;
    e.dataset.state = r.state;
    e.dataset.kind = r.kind;
    e.dataset.seq = String(r.seq);
    e.setAttribute("aria-selected", String(this.shared.selected === key));
    e.title = r.name;
    const label = h("span", { class: "dn-label" });
    label.append(h("code", {}, r.label), h("span", { class: "dn-args" }, (r.error || r.args).slice(0, 200)));
    const bar = h("div", { class: "dn-bar" });
    bar.style.width = longest > 0 ? `${Math.max(1, (100 * r.duration) / longest)}%` : "1px";
    const barCell = h("span");
    barCell.append(bar);
    e.append(
      h("span", { class: "dn-seq" }, r.seq >= 0 ? String(r.seq) : ""),
      badge(r.state),
      label,
      barCell,
      h("span", { class: "dn-dur" }, r.state === "running" || r.state === "waiting" ? "…" : formatDuration(r.duration)),
    );
    e.addEventListener("click", () => {
      this.shared.selected = key;
      this.shared.detail = {
        kind: "detail",
        seq: r.seq,
        name: r.name,
        label: r.label,
        args: r.args,
        output_html: "",
        output_text: "loading…",
        error: r.error,
        why: "",
      };
      this.shared.send({ kind: "inspect", seq: r.seq, name: r.name });
      for (const v of this.shared.views) v();
    });
    return e;
  }

  private renderDetail(d: DetailMessage | null): void {
    if (!d) {
      this.detail.replaceChildren();
      return;
    }
    const parts: HTMLElement[] = [h("h4", {}, `step ${d.seq >= 0 ? d.seq : ""} · ${d.label}`)];
    if (d.seq >= 0 && this.model.get("run")?.can_fork) {
      // a fork of the run from this step: the steps before it replay, this one and the rest run
      const b = h("button", { "data-action": "fork", title: "fork the run from this step" }, "Re-run from here");
      b.addEventListener("click", () => this.shared.send({ kind: "fork", seq: d.seq }));
      parts.push(b);
    }
    if (d.why) parts.push(h("h4", {}, "why"), h("p", { class: "dn-why" }, d.why));
    if (d.args) parts.push(h("h4", {}, "inputs"), h("pre", {}, d.args));
    if (d.output_html) {
      const out = h("div", { class: "dn-output" });
      out.innerHTML = d.output_html; // an HTML table made by pandas in the kernel (escaped)
      parts.push(h("h4", {}, "output"), out);
    } else if (d.output_text) {
      parts.push(h("h4", {}, "output"), h("pre", { class: "dn-output" }, d.output_text));
    }
    if (d.error) parts.push(h("h4", {}, "error"), h("pre", { class: "dn-error" }, d.error));
    this.detail.replaceChildren(...parts);
  }
}
