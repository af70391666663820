// Render every LaTeX string of a JSON list (stdin) with KaTeX, throwOnError as a document
// would; print one JSON list of [index, message] for those that fail. Used by
// tests/test_latex.py when `node` can `require("katex")` (npm install katex; NODE_PATH).
const katex = require("katex");
let input = "";
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  const failed = [];
  JSON.parse(input).forEach((tex, k) => {
    try {
      katex.renderToString(tex, { throwOnError: true, displayMode: true, strict: "error" });
    } catch (err) {
      failed.push([k, String(err.message)]);
    }
  });
  process.stdout.write(JSON.stringify(failed));
});
