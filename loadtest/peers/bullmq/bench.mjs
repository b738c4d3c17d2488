// BullMQ side of loadtest/peers/run.sh: (1) burn-down of N queued no-op jobs by one Worker
// (concurrency 200, removeOnComplete), (2) steady throughput at a given rate with the
// enqueue -> start latency of every job. Prints one JSON line per phase, with the worker
// process's CPU time per job and Redis's (INFO cpu deltas).
//
// usage: node bench.mjs burn N | node bench.mjs steady RATE SECONDS
import { Queue, Worker } from "bullmq";
import IORedis from "ioredis";

const url = process.env.REDIS_URL || "redis://127.0.0.1:6379";
const mode = process.argv[2];
const name = `peerbench${process.pid}`;
const connection = new IORedis(url, { maxRetriesPerRequest: null });
const admin = new IORedis(url);

async function redisCpu() {
  const info = await admin.info("cpu");
  const get = (k) => Number((info.match(new RegExp(`${k}:([0-9.]+)`)) || [])[1] || 0);
  return get("used_cpu_sys") + get("used_cpu_user");
}

function pct(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function burn(n) {
  const queue = new Queue(name, { connection });
  const opts = { removeOnComplete: true, removeOnFail: true };
  for (let i = 0; i < n; i += 1000) {
    const k = Math.min(1000, n - i);
    await queue.addBulk(Array.from({ length: k }, () => ({ name: "noop", data: {}, opts })));
    if ((i / 1000) % 50 === 0) process.stderr.write(`  bullmq: queued ${i + k}/${n}\n`);
  }
  let done = 0;
  const cpu0 = process.cpuUsage();
  const r0 = await redisCpu();
  const t0 = process.hrtime.bigint();
  const finished = new Promise((resolve) => {
    const worker = new Worker(name, async () => {}, { connection, concurrency: 200 });
    worker.on("completed", () => {
      done += 1;
      if (done === n) resolve(worker);
    });
  });
  const worker = await finished;
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  const cpu = process.cpuUsage(cpu0);
  const redis = (await redisCpu()) - r0;
  await worker.close();
  await queue.obliterate({ force: true });
  await queue.close();
  console.log(JSON.stringify({
    peer: "bullmq", phase: "burn-down", jobs: n, seconds: secs, jobs_per_s: n / secs,
    worker_cpu_us_per_job: (cpu.user + cpu.system) / n,
    redis_cpu_us_per_job: (redis * 1e6) / n,
  }));
}

async function steady(rate, seconds) {
  const queue = new Queue(name, { connection });
  const lat = [];
  const worker = new Worker(name, async (job) => {
    lat.push(Date.now() - job.data.t);
  }, { connection, concurrency: 200 });
  const opts = { removeOnComplete: true, removeOnFail: true };
  const total = Math.round(rate * seconds);
  const t0 = Date.now();
  let sent = 0;
  // add in 10 ms ticks to hold the rate
  while (sent < total) {
    const due = Math.min(total, Math.round(((Date.now() - t0) / 1000) * rate));
    const adds = [];
    for (; sent < due; sent++) adds.push(queue.add("noop", { t: Date.now() }, opts));
    await Promise.all(adds);
    await new Promise((r) => setTimeout(r, 10));
  }
  while (lat.length < total) await new Promise((r) => setTimeout(r, 50));
  await worker.close();
  await queue.obliterate({ force: true });
  await queue.close();
  lat.sort((a, b) => a - b);
  console.log(JSON.stringify({
    peer: "bullmq", phase: "steady", rate, jobs: total,
    start_latency_ms: { p50: pct(lat, 50), p99: pct(lat, 99), max: lat[lat.length - 1] },
  }));
}

try {
  if (mode === "burn") await burn(Number(process.argv[3] || 200000));
  else if (mode === "steady") await steady(Number(process.argv[3] || 10000), Number(process.argv[4] || 20));
  else throw new Error("usage: node bench.mjs burn N | steady RATE SECONDS");
} finally {
  connection.disconnect();
  admin.disconnect();
}
