// An AudioWorklet that plays PCM as it arrives: the page posts Float32Array chunks (mono, at the context's rate);
// process() plays them in order and outputs silence while none is queued. It reports the samples it received
// and played (since the last clear) back to the page (the page's stats and the browser test read them).
class PcmPlayer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = [];
    this.offset = 0; // samples of queue[0] already played
    this.received = 0;
    this.played = 0;
    this.sinceReport = 0;
    this.port.onmessage = (event) => {
      if (event.data instanceof Float32Array) {
        this.queue.push(event.data);
        this.received += event.data.length;
        this.report();
      } else if (event.data && event.data.type === "clear") { // a new utterance, or Stop: drop what is queued
        this.queue = [];
        this.offset = 0;
        this.received = this.played = 0;
        this.report();
      }
    };
  }

  report() {
    this.sinceReport = 0;
    this.port.postMessage({ received: this.received, played: this.played, queued: this.queuedSamples() });
  }

  queuedSamples() {
    let n = -this.offset;
    for (const chunk of this.queue) n += chunk.length;
    return Math.max(0, n);
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    let i = 0;
    while (i < out.length && this.queue.length) {
      const chunk = this.queue[0];
      const n = Math.min(out.length - i, chunk.length - this.offset);
      out.set(chunk.subarray(this.offset, this.offset + n), i);
      i += n;
      this.offset += n;
      if (this.offset === chunk.length) {
        this.queue.shift();
        this.offset = 0;
      }
    }
    out.fill(0, i);
    this.played += i;
    this.sinceReport += out.length;
    if (i > 0 && this.sinceReport >= 2400) this.report(); // every 100 ms while playing
    return true;
  }
}

registerProcessor("pcm-player", PcmPlayer);
