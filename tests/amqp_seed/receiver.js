const amqp = require('amqplib');
async function receive() {
  const connection = await amqp.connect('amqp://localhost');
  const channel = await connection.createChannel();
  const queueName = 'hello';
  await channel.assertQueue(queueName);
  console.log(`[*] Waiting for messages in ${queueName}. To exit press CTRL+C`);
  channel.consume(queueName, (msg) => {
    if (msg !== null) {
      console.log(`[x] Received '${msg.content.toString()}'`);
      channel.ack(msg); // acknowledging to RabbitMQ that message is consumed successfully and it can be removed from the queue
    }
  });
}
receive().catch(console.error);
