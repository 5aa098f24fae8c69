// Generated from durable_nb/widgets/_messages.py (typescript()) by `npm run messages`.
// Do not edit: change the Python file and regenerate (a test compares the two).

export type StepState = "running" | "executed" | "replayed" | "failed" | "waiting";

export type StepRow = {
  seq: number;
  kind: string;
  name: string;
  label: string;
  state: StepState;
  duration: number;
  args: string;
  error: string;
};

export type RunInfo = {
  run_id: string;
  workflow: string;
  status: string;
  detail: string;
  executions: number;
  live: boolean;
  can_cancel: boolean;
  can_resume: boolean;
  can_fork: boolean;
  forked_from: string;
  error: string;
};

export type Totals = {
  steps: number;
  executed: number;
  replayed: number;
  failed: number;
  running: number;
  saved_seconds: number;
};

export type Waiting = {
  kind: "signal" | "timer";
  name: string;
  until: string;
};

export type WidgetState = {
  run: RunInfo;
  steps: StepRow[];
  steps_rev: number;
  totals: Totals;
  waiting: Waiting[];
};

export type RowsMessage = {
  kind: "rows";
  rev: number;
  updates: [number, StepRow][];
};

export type DetailMessage = {
  kind: "detail";
  seq: number;
  name: string;
  label: string;
  args: string;
  output_html: string;
  output_text: string;
  error: string;
  why: string;
};

export type NoticeMessage = {
  kind: "notice";
  level: "info" | "error";
  text: string;
};

export type SyncMessage = {
  kind: "sync";
  rev: number;
};

export type SignalMessage = {
  kind: "signal";
  name: string;
  payload: string;
};

export type CancelMessage = {
  kind: "cancel";
};

export type ResumeMessage = {
  kind: "resume";
};

export type InspectMessage = {
  kind: "inspect";
  seq: number;
  name: string;
};

export type ForkMessage = {
  kind: "fork";
  seq: number;
};

export type KernelMessage = RowsMessage | DetailMessage | NoticeMessage;
export type FrontendMessage = SyncMessage | SignalMessage | CancelMessage | ResumeMessage | InspectMessage | ForkMessage;
