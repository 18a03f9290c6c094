// Reads the gateway's schema the way GraphiQL, Apollo and graphql-codegen do (graphql-js's own
// introspection query and buildClientSchema), validates the documents given on stdin against
// it, runs the valid ones, and prints one JSON report on stdout.
//
// Usage: GRAPHQL_JS_DIR=<dir with node_modules/graphql> [GRAPHQL_API_KEY=<key>] \
//        node client.mjs <url> < documents.json
// (the key, sent as X-Api-Key, is what a tool is configured with: the gateway has no anonymous
// access unless its schema file grants it; introspection needs none)
import { createRequire } from "node:module";

const require = createRequire(`${process.env.GRAPHQL_JS_DIR}/package.json`);
const { buildClientSchema, getIntrospectionQuery, parse, printSchema, validate, version } =
  require("graphql");

const url = process.argv[2];
const post = async (query, variables = {}) => {
  const response = await fetch(url, {
    method: "POST",
    headers: {
      "content-type": "application/json",
      ...(process.env.GRAPHQL_API_KEY ? { "x-api-key": process.env.GRAPHQL_API_KEY } : {}),
    },
    body: JSON.stringify({ query, variables }),
  });
  return response.json();
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
const documents = JSON.parse(input);

const report = { version, introspection: {} };
for (const [name, options] of Object.entries({
  default: {},
  full: {
    descriptions: true,
    specifiedByUrl: true,
    directiveIsRepeatable: true,
    schemaDescription: true,
    inputValueDeprecation: true,
  },
})) {
  const answer = await post(getIntrospectionQuery(options));
  report.introspection[name] = answer.errors ?? null;
  if (name === "default" && !answer.errors) {
    const schema = buildClientSchema(answer.data);
    report.sdl = printSchema(schema);
    report.documents = [];
    for (const { query, variables } of documents) {
      const errors = validate(schema, parse(query)).map((e) => e.message);
      const answer = errors.length === 0 ? await post(query, variables) : null;
      report.documents.push({ errors, answer });
    }
  }
}
console.log(JSON.stringify(report));
