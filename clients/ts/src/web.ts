// Transports for browsers (fetch): the Connect protocol or gRPC-Web to the HTTP port.
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-web";
import type { Transport } from "@connectrpc/connect";

/** The Connect protocol to the HTTP port (JSON unless `binary`); a page served by the HTTP
 * port itself can pass `location.origin`. */
export function connectTransport(baseUrl: string, options: { binary?: boolean } = {}): Transport {
  return createConnectTransport({ baseUrl, useBinaryFormat: options.binary ?? false });
}

/** gRPC-Web to the HTTP port (binary). */
export function grpcWebTransport(baseUrl: string): Transport {
  return createGrpcWebTransport({ baseUrl });
}
