// The timeline's rows on the front-end side: the synced list plus the kernel's patches, and
// the pure helpers the view uses (folding replayed runs, the virtual window, formatting).
// No DOM here, so vitest checks it in plain Node.

import type { RowsMessage, StepRow } from "./messages";

export type Applied = "applied" | "stale" | "gap";

/** Rows at a revision. Patches apply in order; a gap means the kernel must resend all. */
export class RowStore {
  rows: StepRow[];
  rev: number;

  constructor(rows: StepRow[], rev: number) {
    this.rows = rows.slice();
    this.rev = rev;
  }

  reset(rows: StepRow[], rev: number): void {
    this.rows = rows.slice();
    this.rev = rev;
  }

  apply(msg: RowsMessage): Applied {
    if (msg.rev <= this.rev) return "stale";
    if (msg.rev !== this.rev + 1) return "gap";
    for (const [i, row] of msg.updates) {
      if (i > this.rows.length) return "gap"; // rows are appended in order: a hole is a gap
      this.rows[i] = row;
    }
    this.rev = msg.rev;
    return "applied";
  }
}

/** One line of the timeline: a step, or a fold of consecutive replayed steps. */
export type Item =
  | { type: "row"; index: number; row: StepRow }
  | { type: "group"; first: number; count: number; saved: number };

export const FOLD_AT = 8;

/** The rows as timeline lines; each run of `foldAt`+ replayed steps is one line unless its
 * first index is in `expanded`. Same rule as the static picture (widgets/_static.py). */
export function foldRows(rows: StepRow[], expanded: ReadonlySet<number>, foldAt = FOLD_AT): Item[] {
  const items: Item[] = [];
  const n = rows.length;
  let i = 0;
  while (i < n) {
    let j = i;
    while (j < n && rows[j]!.state === "replayed") j++;
    if (j - i >= foldAt && !expanded.has(i)) {
      let saved = 0;
      for (let k = i; k < j; k++) saved += rows[k]!.duration;
      items.push({ type: "group", first: i, count: j - i, saved });
      i = j;
      continue;
    }
    const end = Math.max(j, i + 1);
    for (let k = i; k < end; k++) items.push({ type: "row", index: k, row: rows[k]! });
    i = end;
  }
  return items;
}

/** The items to draw for a scroll position: [start, end) with `overscan` lines either side. */
export function visibleRange(
  scrollTop: number,
  viewport: number,
  lineHeight: number,
  count: number,
  overscan = 10,
): [number, number] {
  const first = Math.floor(Math.max(0, scrollTop) / lineHeight);
  const shown = Math.ceil(viewport / lineHeight) + 1;
  const start = Math.max(0, first - overscan);
  const end = Math.min(count, first + shown + overscan);
  return [start, Math.max(start, end)];
}

export function formatDuration(seconds: number): string {
  if (seconds >= 3600) return `${(seconds / 3600).toFixed(1)} h`;
  if (seconds >= 60) return `${(seconds / 60).toFixed(1)} min`;
  if (seconds >= 10) return `${seconds.toFixed(1)} s`;
  if (seconds >= 1) return `${seconds.toFixed(2)} s`;
  return `${(seconds * 1000).toFixed(1)} ms`;
}

/** The payload field's text as the kernel expects it: "" (null) or JSON text; an error
 * message when it is not JSON, so the button can say so before anything is sent. */
export function checkPayload(text: string): string | null {
  if (text.trim() === "") return null;
  try {
    JSON.parse(text);
    return null;
  } catch (e) {
    return `not JSON (${(e as Error).message}); quote text: "yes", or use true, 42, {"ok": true}`;
  }
}

/** The numbers a person sees: each step (seq >= 0) numbered 0, 1, 2... in seq order, without
 * the gaps that engine bookkeeping leaves in seq; the same numbers as `durable-nb trace`
 * (trace.py's `step`) and `dn.fork(from_step=)`. Keyed by "seq:name". */
export function stepNumbers(rows: StepRow[]): Map<string, number> {
  const seqs = [...new Set(rows.filter((r) => r.seq >= 0).map((r) => r.seq))].sort((a, b) => a - b);
  const rank = new Map(seqs.map((seq, n) => [seq, n] as const));
  const out = new Map<string, number>();
  for (const r of rows) if (r.seq >= 0) out.set(`${r.seq}:${r.name}`, rank.get(r.seq)!);
  return out;
}

/** What the duration cell of a row says: a running step's elapsed time, ticking (`nowSeconds`
 * is the epoch time now); a waiting one's "…"; a finished one's duration. */
export function durationText(row: StepRow, nowSeconds: number): string {
  if (row.state === "running") {
    return row.started > 0 ? formatDuration(Math.max(0, nowSeconds - row.started)) : "…";
  }
  if (row.state === "waiting") return "…";
  return formatDuration(row.duration);
}

/** "120+35 tokens" for an LLM call that reported its usage, "" otherwise. */
export function tokensText(prompt: number, completion: number): string {
  return prompt || completion ? `${prompt.toLocaleString()}+${completion.toLocaleString()} tokens` : "";
}
