// The six pop-up sounds, synthesised with WebAudio (no audio files to ship).
// Each is a list of [frequency Hz, start s, duration s, waveform].
export const SOUNDS = {
  chime: [[880, 0, 0.25, "sine"], [1320, 0.12, 0.35, "sine"]],
  bell: [[660, 0, 0.6, "triangle"], [1320, 0, 0.4, "sine"]],
  ping: [[1760, 0, 0.15, "sine"]],
  pop: [[400, 0, 0.08, "square"]],
  marimba: [[523, 0, 0.15, "sine"], [659, 0.1, 0.15, "sine"], [784, 0.2, 0.2, "sine"]],
  harp: [[392, 0, 0.3, "triangle"], [494, 0.06, 0.3, "triangle"], [587, 0.12, 0.3, "triangle"], [784, 0.18, 0.4, "triangle"]],
};

let context = null;

// Plays one sound; resolves with the AudioContext state so callers know it really played.
export async function play(name) {
  const notes = SOUNDS[name];
  if (!notes) return "unknown";
  context = context || new AudioContext();
  if (context.state === "suspended") await context.resume().catch(() => {});
  const start = context.currentTime + 0.01;
  for (const [frequency, offset, duration, type] of notes) {
    const osc = context.createOscillator();
    const gain = context.createGain();
    osc.type = type;
    osc.frequency.value = frequency;
    gain.gain.setValueAtTime(0.2, start + offset);
    gain.gain.exponentialRampToValueAtTime(0.001, start + offset + duration);
    osc.connect(gain).connect(context.destination);
    osc.start(start + offset);
    osc.stop(start + offset + duration + 0.02);
  }
  // Recorded for the page's own status line (and the browser tests).
  document.body.dataset.lastSound = name;
  document.body.dataset.audioState = context.state;
  return context.state;
}
