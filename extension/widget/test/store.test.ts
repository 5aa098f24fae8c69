import { describe, expect, it } from "vitest";
import type { StepRow, StepState } from "../src/messages";
import {
  FOLD_AT,
  RowStore,
  checkPayload,
  durationText,
  foldRows,
  formatDuration,
  stepNumbers,
  tokensText,
  visibleRange,
} from "../src/store";

function row(seq: number, state: StepState = "executed", duration = 0.001): StepRow {
  return {
    seq,
    kind: "effect",
    name: `m.f${seq}`,
    label: `f${seq}`,
    state,
    duration,
    args: "()",
    error: "",
    started: 0,
    progress: "",
    prompt_tokens: 0,
    completion_tokens: 0,
  };
}

describe("RowStore", () => {
  it("applies patches in order: upserts and appends", () => {
    const s = new RowStore([row(0, "running")], 3);
    expect(s.apply({ kind: "rows", rev: 4, updates: [[0, row(0)], [1, row(1, "running")]] })).toBe("applied");
    expect(s.rows.map((r) => r.state)).toEqual(["executed", "running"]);
    expect(s.rev).toBe(4);
  });

  it("ignores a stale patch and reports a gap", () => {
    const s = new RowStore([], 5);
    expect(s.apply({ kind: "rows", rev: 5, updates: [[0, row(0)]] })).toBe("stale");
    expect(s.apply({ kind: "rows", rev: 7, updates: [[0, row(0)]] })).toBe("gap");
    expect(s.rows).toEqual([]);
    expect(s.rev).toBe(5);
  });

  it("treats a hole in the rows as a gap", () => {
    const s = new RowStore([], 0);
    expect(s.apply({ kind: "rows", rev: 1, updates: [[2, row(2)]] })).toBe("gap");
  });

  it("copies the rows it is given", () => {
    const rows = [row(0)];
    const s = new RowStore(rows, 1);
    s.apply({ kind: "rows", rev: 2, updates: [[1, row(1)]] });
    expect(rows).toHaveLength(1);
  });
});

describe("foldRows", () => {
  it("folds a long run of replayed steps into one line with the time saved", () => {
    const rows = [
      ...Array.from({ length: 20 }, (_, i) => row(i, "replayed", 0.5)),
      row(20, "executed"),
      row(21, "waiting"),
    ];
    const items = foldRows(rows, new Set());
    expect(items).toHaveLength(3);
    expect(items[0]).toEqual({ type: "group", first: 0, count: 20, saved: 10 });
    expect(items[1]).toMatchObject({ type: "row", index: 20 });
  });

  it("keeps short replayed runs and expanded groups as rows", () => {
    const short = Array.from({ length: FOLD_AT - 1 }, (_, i) => row(i, "replayed"));
    expect(foldRows(short, new Set()).every((it) => it.type === "row")).toBe(true);
    const long = Array.from({ length: 30 }, (_, i) => row(i, "replayed"));
    expect(foldRows(long, new Set([0]))).toHaveLength(30);
  });

  it("folds 5,000 replayed steps in a few milliseconds", () => {
    const rows = Array.from({ length: 5000 }, (_, i) => row(i, i % 1000 === 999 ? "executed" : "replayed"));
    const t0 = performance.now();
    const items = foldRows(rows, new Set());
    expect(items.length).toBe(10);
    expect(performance.now() - t0).toBeLessThan(200); // generous: a loose bound, not a benchmark
  });
});

describe("visibleRange", () => {
  it("draws only the lines in view plus overscan", () => {
    expect(visibleRange(0, 330, 22, 5000, 10)).toEqual([0, 26]);
    expect(visibleRange(22 * 1000, 330, 22, 5000, 10)).toEqual([990, 1026]);
    expect(visibleRange(22 * 4990, 330, 22, 5000, 10)).toEqual([4980, 5000]);
    expect(visibleRange(0, 330, 22, 0, 10)).toEqual([0, 0]);
  });
});

describe("formatting and payloads", () => {
  it("formats durations", () => {
    expect(formatDuration(0.0123)).toBe("12.3 ms");
    expect(formatDuration(2.5)).toBe("2.50 s");
    expect(formatDuration(75)).toBe("1.3 min");
  });

  it("accepts empty or JSON payloads and explains anything else", () => {
    expect(checkPayload("")).toBeNull();
    expect(checkPayload(' {"ok": true} ')).toBeNull();
    expect(checkPayload("yes")).toMatch(/^not JSON \(.*\); quote text/);
  });
});

describe("what a row shows", () => {
  it("numbers steps without the gaps bookkeeping leaves in seq, in seq order", () => {
    const rows = [row(3), row(0), row(1), { ...row(-1, "waiting"), name: "dn.signal" }];
    const n = stepNumbers(rows);
    expect([n.get("0:m.f0"), n.get("1:m.f1"), n.get("3:m.f3")]).toEqual([0, 1, 2]);
    expect(n.has("-1:dn.signal")).toBe(false);
  });

  it("ticks a running step's elapsed time and keeps a finished one's duration", () => {
    const running = { ...row(0, "running"), started: 1000 };
    expect(durationText(running, 1003)).toBe("3.00 s");
    expect(durationText(running, 1006)).toBe("6.00 s");
    expect(durationText(row(1, "running"), 1006)).toBe("…"); // no start known
    expect(durationText(row(2, "waiting"), 1006)).toBe("…");
    expect(durationText(row(3, "executed", 12), 1006)).toBe("12.0 s");
  });

  it("shows tokens only when a call reported them", () => {
    expect(tokensText(0, 0)).toBe("");
    expect(tokensText(1200, 35)).toBe(`${(1200).toLocaleString()}+35 tokens`);
  });
});
