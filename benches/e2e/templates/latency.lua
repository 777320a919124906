-- wrk hook: print one machine-readable line with the counts and percentiles (microseconds),
-- including p99.9 which `wrk --latency` does not show. Defines no request()/response(), so wrk
-- keeps its fast static-request path.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%.0f duration_us=%.0f bytes=%.0f err_connect=%.0f err_read=%.0f err_write=%.0f err_status=%.0f err_timeout=%.0f p50=%.0f p90=%.0f p99=%.0f p999=%.0f max=%.0f mean=%.1f\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
