// Sends the six calls with Segment's official Node SDK (@segment/analytics-node) to a clickpulse.
// Usage: node send_node.mjs <clickpulse URL> <write key> <JSON array of calls>
// Each call is {"method": "track"|"page"|..., "params": {...}}; prints "sent" or the SDK's error.
import { Analytics } from '@segment/analytics-node'

const [host, writeKey, callsJson] = process.argv.slice(2)
const calls = JSON.parse(callsJson)
const analytics = new Analytics({ writeKey, host, path: '/v1/batch', flushAt: calls.length, maxRetries: 0 })
let failure = null
analytics.on('error', (error) => { failure = error })
for (const { method, params } of calls) {
  if (params.timestamp) params.timestamp = new Date(params.timestamp)
  analytics[method](params)
}
await analytics.closeAndFlush({ timeout: 20000 })
if (failure) {
  console.log('error', failure.code ?? '', failure.reason?.message ?? failure.message ?? String(failure))
  process.exit(1)
}
console.log('sent')
