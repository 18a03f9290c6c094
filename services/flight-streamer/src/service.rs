//! The Flight RPCs. ListFlights names one flight per entity's events and one per exportable
//! table, each with its schema; GetFlightInfo and GetSchema take a descriptor that is either a
//! command holding a ticket (any form `ticket` accepts) or a path `["events", <Entity>]` /
//! `["export", <table>]`; DoGet streams a ticket. Handshake trades the token (as the first
//! request's payload, or the password of a Basic `authorization` header, which is what pyarrow's
//! `authenticate_basic_token` sends) for the `authorization: Bearer` header every other RPC
//! needs (checked by `auth`). The write RPCs are not offered.

use std::pin::Pin;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::flight_descriptor::DescriptorType;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaAsIpc, SchemaResult, Ticket,
};
use async_nats::jetstream;
use futures::{Stream, StreamExt};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Token;
use crate::events::{self, Batching};
use crate::export;
use crate::frames::{self, Encoder};
use crate::schema::{EntityTypes, SEQ, Types};
use crate::settings::FlightSettings;
use crate::ticket::{self, EventsTicket};

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A ticket checked against the schema file.
enum Resolved {
    Events(Arc<EntityTypes>, EventsTicket),
    Export(export::ExportPlan),
}

impl Resolved {
    fn schema(&self) -> SchemaRef {
        match self {
            Resolved::Events(types, _) => types.events.clone(),
            Resolved::Export(plan) => plan.schema.clone(),
        }
    }
}

pub struct Flight {
    js: jetstream::Context,
    pool: PgPool,
    types: Types,
    token: Token,
    settings: FlightSettings,
}

impl Flight {
    pub fn new(
        js: jetstream::Context,
        pool: PgPool,
        types: Types,
        token: Token,
        settings: FlightSettings,
    ) -> Self {
        Self {
            js,
            pool,
            types,
            token,
            settings,
        }
    }

    fn resolve(&self, ticket: &[u8]) -> Result<Resolved, Status> {
        let parsed =
            ticket::Ticket::parse(ticket).map_err(|e| Status::invalid_argument(e.to_string()))?;
        match parsed {
            ticket::Ticket::Events(events) => {
                let types = self.types.entity(&events.entity).ok_or_else(|| {
                    Status::not_found(format!(
                        "no entity `{}` in the schema file (ListFlights names them)",
                        events.entity
                    ))
                })?;
                Ok(Resolved::Events(types.clone(), events))
            }
            ticket::Ticket::Export(export) => {
                let types = self.types.table(&export.table).ok_or_else(|| {
                    Status::not_found(format!(
                        "no table `{}` in the schema file (ListFlights names them)",
                        export.table
                    ))
                })?;
                let plan = export::plan(types, &export)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                Ok(Resolved::Export(plan))
            }
        }
    }

    /// The ticket a descriptor stands for.
    fn ticket_of(descriptor: &FlightDescriptor) -> Result<Vec<u8>, Status> {
        match descriptor.r#type() {
            DescriptorType::Cmd => Ok(descriptor.cmd.to_vec()),
            DescriptorType::Path => match descriptor.path.as_slice() {
                [kind, entity] if kind == "events" => {
                    Ok(ticket::Ticket::events_of(entity).into_bytes())
                }
                [kind, table] if kind == "export" => {
                    Ok(ticket::Ticket::export_of(table).into_bytes())
                }
                _ => Err(Status::invalid_argument(
                    "a descriptor path is [\"events\", <Entity>] or [\"export\", <table>]",
                )),
            },
            DescriptorType::Unknown => Err(Status::invalid_argument("descriptor has no type")),
        }
    }

    async fn info(
        &self,
        descriptor: FlightDescriptor,
        ticket: Vec<u8>,
    ) -> Result<FlightInfo, Status> {
        let resolved = self.resolve(&ticket)?;
        let total = match &resolved {
            Resolved::Events(types, events) => events::count(&self.js, types, events).await?,
            Resolved::Export(plan) => {
                export::count(&self.pool, plan, export::COUNT_TIMEOUT).await?
            }
        };
        FlightInfo::new()
            .try_with_schema(&resolved.schema())
            .map_err(|e| Status::internal(e.to_string()))
            .map(|info| {
                info.with_descriptor(descriptor)
                    .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
                    .with_total_records(total)
                    .with_ordered(true)
            })
    }

    fn batching(&self) -> Batching {
        Batching {
            rows: self.settings.batch_rows,
            bytes: self.settings.batch_bytes,
            linger: self.settings.linger,
            keepalive: self.settings.keepalive,
        }
    }
}

#[tonic::async_trait]
impl FlightService for Flight {
    type HandshakeStream = Boxed<HandshakeResponse>;
    type ListFlightsStream = Boxed<FlightInfo>;
    type DoGetStream = Boxed<FlightData>;
    type DoPutStream = Boxed<PutResult>;
    type DoActionStream = Boxed<arrow_flight::Result>;
    type ListActionsStream = Boxed<ActionType>;
    type DoExchangeStream = Boxed<FlightData>;

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut accepted = self.token.basic(authorization.as_deref())
            || self.token.bearer(authorization.as_deref());
        if !accepted {
            let mut requests = request.into_inner();
            if let Some(first) = requests.message().await? {
                accepted = std::str::from_utf8(&first.payload)
                    .is_ok_and(|payload| self.token.matches(payload));
            }
        }
        if !accepted {
            return Err(Status::unauthenticated(
                "the handshake did not carry the token",
            ));
        }
        let reply = HandshakeResponse {
            protocol_version: 0,
            payload: self.token.as_str().as_bytes().to_vec().into(),
        };
        let mut response: Response<Self::HandshakeStream> =
            Response::new(futures::stream::iter([Ok(reply)]).boxed());
        let bearer = format!("Bearer {}", self.token.as_str())
            .parse()
            .map_err(|_| Status::internal("the token is not a valid header value"))?;
        response.metadata_mut().insert("authorization", bearer);
        Ok(response)
    }

    async fn list_flights(
        &self,
        _request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        let mut infos = Vec::new();
        for types in self.types.entities() {
            let descriptor =
                FlightDescriptor::new_path(vec!["events".into(), types.entity.clone()]);
            let ticket = ticket::Ticket::events_of(&types.entity).into_bytes();
            infos.push(Ok(self.info(descriptor, ticket).await?));
        }
        for types in self.types.entities() {
            let descriptor = FlightDescriptor::new_path(vec!["export".into(), types.table.clone()]);
            let ticket = ticket::Ticket::export_of(&types.table).into_bytes();
            infos.push(Ok(self.info(descriptor, ticket).await?));
        }
        Ok(Response::new(futures::stream::iter(infos).boxed()))
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let descriptor = request.into_inner();
        let ticket = Self::ticket_of(&descriptor)?;
        Ok(Response::new(self.info(descriptor, ticket).await?))
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented(
            "use GetFlightInfo: every flight is ready at once",
        ))
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        let ticket = Self::ticket_of(&request.into_inner())?;
        let schema = self.resolve(&ticket)?.schema();
        let options = IpcWriteOptions::default();
        let result = SchemaAsIpc::new(&schema, &options)
            .try_into()
            .map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
        Ok(Response::new(result))
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let resolved = self.resolve(&request.into_inner().ticket)?;
        let schema = resolved.schema();
        let (tx, rx) = mpsc::channel(self.settings.queued_batches);
        let encoder = match resolved {
            Resolved::Events(types, ticket) => {
                let opened = events::open(&self.js, &types, &ticket).await?;
                tokio::spawn(events::produce(opened, types, ticket, self.batching(), tx));
                Encoder::new(self.settings.max_message_bytes, Some(SEQ), "events")
            }
            Resolved::Export(plan) => {
                tokio::spawn(export::produce(
                    self.pool.clone(),
                    plan,
                    self.settings.batch_rows,
                    self.settings.batch_bytes,
                    tx,
                ));
                Encoder::new(self.settings.max_message_bytes, None, "export")
            }
        };
        Ok(Response::new(frames::stream(&schema, encoder, rx).boxed()))
    }

    async fn do_put(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        Err(Status::unimplemented("the flight-streamer is read-only"))
    }

    async fn do_action(
        &self,
        _request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        Err(Status::unimplemented(
            "the flight-streamer offers no actions",
        ))
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        Ok(Response::new(futures::stream::empty().boxed()))
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("the flight-streamer is read-only"))
    }
}
