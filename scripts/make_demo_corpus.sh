#!/usr/bin/env bash
# Regenerate the bundled demo corpus in data/demo/ from data/demo/sentences.txt:
#
#     bash scripts/make_demo_corpus.sh                   # the demo corpus (6 test clips, 26 training clips)
#     bash scripts/make_demo_corpus.sh heldout           # data/demo/heldout/: other sentences, same voice
#
# Each line of sentences.txt (Harvard sentences, IEEE 1969) is spoken by espeak-ng's
# American English voice, which writes 22,050 Hz mono 16-bit wav natively, the
# format of LJSpeech, so nothing is resampled; a -70 dBFS noise floor is then added. espeak-ng is deterministic: the same
# espeak-ng version gives byte-identical files. The first TEST_CLIPS clips are the
# test set and the rest the training set, the same rule as LJSpeech's split.
# Lists use LJSpeech's "path|text" lines with paths relative to the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

VOICE=en-us
WORDS_PER_MINUTE=150  # espeak-ng's default of 175 runs words together
NOISE_FLOOR_DB=-70
if [ "${1:-}" = heldout ]; then
    # Sentences the demo never trains or tests on, to measure a demo model on speech it has not seen:
    # every clip goes to test_files.txt.
    DEMO=data/demo/heldout
    TEST_CLIPS=1000
else
    DEMO=data/demo
    TEST_CLIPS=6
fi

command -v espeak-ng >/dev/null || { echo "error: espeak-ng not found (apt-get install espeak-ng)" >&2; exit 1; }
rm -rf "$DEMO/wavs"
mkdir -p "$DEMO/wavs"
: > "$DEMO/train_files.txt"
: > "$DEMO/test_files.txt"

number=0
while IFS= read -r sentence; do
    [ -z "$sentence" ] && continue
    number=$((number + 1))
    wav=$(printf '%s/wavs/demo_%03d.wav' "$DEMO" "$number")
    espeak-ng -v "$VOICE" -s "$WORDS_PER_MINUTE" -w "$wav" "$sentence"
    if [ "$number" -le "$TEST_CLIPS" ]; then list=test_files.txt; else list=train_files.txt; fi
    printf '%s|%s\n' "$wav" "$sentence" >> "$DEMO/$list"
done < "$DEMO/sentences.txt"

# espeak-ng writes exact digital silence, which a flow's density can grow on without bound:
# give the corpus the low noise floor every recording has (see scripts/add_noise_floor.py).
python scripts/add_noise_floor.py --level_db "$NOISE_FLOOR_DB" "$DEMO"/wavs/*.wav

[ "$DEMO" = data/demo/heldout ] && rm -f "$DEMO/train_files.txt"
echo "wrote $number clips to $DEMO/wavs with $(espeak-ng --version | sed "s/  Data at.*//")"
